"""A GGUF (v2/v3) reader: header, metadata, tensor infos, and a memmap of the data.

Only the bytes of the tensors a caller asks for are touched, so a pipeline stage
that loads layers 10..20 never pages in layers 0..9. Dequantization is vectorized
numpy, block by block, and covers F32, F16, BF16, Q8_0, Q4_0 and Q4_1.

Layout notes (from the GGUF spec in ggml/docs/gguf.md):
- tensor dims are stored innermost first (ggml ``ne``); numpy shape is reversed;
- the data section starts at the first multiple of ``general.alignment`` (32)
  after the tensor infos, and each tensor's offset is relative to it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32


class GGUFError(ValueError):
    """The file is not a readable GGUF file (bad magic, truncated, corrupt)."""


class UnsupportedTensorType(GGUFError):
    """A tensor uses a ggml quantization type this reader cannot dequantize."""


# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# metadata value type id -> struct format (scalars only)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32,
               5: np.int32, 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64,
               12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: ``shape`` is numpy order (outermost first)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type{self.type_id}", 0, 0))[0]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


_U64 = struct.Struct("<Q")


class _Cursor:
    """Bounds-checked little-endian reads over a byte buffer."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf = buf
        self.pos = 0
        self.path = path

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF header at byte {self.pos}; "
                            "re-download the model file")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{self.path}: corrupt string at byte {self.pos}") from exc

    def _strings(self, count: int) -> list[str]:
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length = _U64.unpack_from
        try:
            for _ in range(count):
                (n,) = length(buf, pos)
                pos += 8
                if pos + n > end:
                    raise GGUFError(f"{self.path}: truncated GGUF header at byte {pos}; re-download the model file")
                out.append(str(buf[pos:pos + n], "utf-8"))
                pos += n
        except struct.error:
            raise GGUFError(f"{self.path}: truncated GGUF header at byte {pos}; re-download the model file") from None
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{self.path}: corrupt string at byte {pos}") from exc
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.scalar("<I")
            count = self.scalar("<Q")
            if etype in _NP_SCALARS:  # fast path: one frombuffer for the whole array
                dt = np.dtype(_NP_SCALARS[etype]).newbyteorder("<")
                raw = self.take(count * dt.itemsize)
                return np.frombuffer(raw, dtype=dt).tolist()
            if count > len(self.buf):
                raise GGUFError(f"{self.path}: corrupt array length {count}")
            if etype == _STRING:  # vocabularies: ~100k strings, read in one tight loop
                return self._strings(count)
            return [self.value(etype) for _ in range(count)]
        raise GGUFError(f"{self.path}: corrupt metadata value type {vtype} at byte {self.pos}")


_OPEN: dict[tuple[str, int, int], GGUFFile] = {}


def open_gguf(path: str | Path) -> GGUFFile:
    """An opened GGUFFile, parsed once per process per file version (path, size, mtime):
    the config, the tokenizer and every stage load of a node share one parse."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise GGUFError(f"{path}: cannot open ({exc.strerror})") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    gf = _OPEN.get(key)
    if gf is None:
        gf = GGUFFile(path)
        _OPEN.clear()  # keep one file: a node serves one model
        _OPEN[key] = gf
    return gf


class GGUFFile:
    """An opened GGUF file: ``metadata`` dict, ``tensors`` dict of TensorInfo.

    Tensor data is a read-only ``np.memmap``; ``raw(name)`` returns the tensor's
    bytes without copying, ``dequantize(name)`` a float32 array in numpy shape.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise GGUFError(f"{self.path}: cannot map file ({exc})") from exc
        cur = _Cursor(memoryview(self._mm), self.path)
        if bytes(cur.take(4)) != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic)")
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version} (need 2 or 3)")
        n_tensors = cur.scalar("<Q")
        n_kv = cur.scalar("<Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise GGUFError(f"{self.path}: corrupt header (tensors={n_tensors}, kv={n_kv})")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > 8:
                raise GGUFError(f"{self.path}: corrupt tensor info for {name!r} ({n_dims} dims)")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, rel in infos:
            n = int(np.prod(shape, dtype=np.int64))
            if type_id in GGML_TYPES:
                _, block, bsize = GGML_TYPES[type_id]
                nbytes = n // block * bsize
            else:
                nbytes = 0
            offset = data_start + rel
            if offset + nbytes > len(self._mm):
                raise GGUFError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                                f"{offset + nbytes} but the file has {len(self._mm)}; "
                                "re-download the model file")
            self.tensors[name] = TensorInfo(name, shape, type_id, offset, nbytes)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 memmap view (no copy, no read)."""
        info = self.tensors[name]
        if info.type_id not in GGML_TYPES:
            raise UnsupportedTensorType(f"{self.path}: tensor {name!r} has unknown ggml type "
                                        f"{info.type_id}")
        return self._mm[info.offset:info.offset + info.nbytes]

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy shape (outermost dim first)."""
        info = self.tensors[name]
        return dequantize(self.raw(name), info.type_name, info.shape, name=name)


def blocks(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Split a quantized tensor's bytes into its block fields, shaped (rows, blocks, ...).

    Q8_0 -> scale (f16) + qs (int8, 32); Q4_0 -> scale + qs (uint8 0..15, 32);
    Q4_1 -> scale + min (f16) + qs (uint8 0..15, 32), value = scale*q + min.
    Nibble order follows ggml: element j < 16 is the low nibble of byte j, element
    j >= 16 the high nibble of byte j-16.
    """
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    cols = shape[-1]
    if cols % 32:
        raise GGUFError(f"row length {cols} is not a multiple of the block size 32")
    nb = cols // 32
    if type_name == "Q8_0":
        rec = raw.view(np.dtype([("d", "<f2"), ("qs", "i1", 32)])).reshape(rows, nb)
        return {"scale": rec["d"], "qs": rec["qs"]}
    if type_name in ("Q4_0", "Q4_1"):
        fields = [("d", "<f2")] + ([("m", "<f2")] if type_name == "Q4_1" else []) + [("qs", "u1", 16)]
        rec = raw.view(np.dtype(fields)).reshape(rows, nb)
        packed = rec["qs"]
        qs = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)
        out = {"scale": rec["d"], "qs": qs}
        if type_name == "Q4_1":
            out["min"] = rec["m"]
        return out
    raise UnsupportedTensorType(f"{type_name} has no block form")


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...], name: str = "") -> np.ndarray:
    """Dequantize a tensor's raw bytes to float32 of ``shape``."""
    if type_name == "F32":
        return raw.view("<f4").reshape(shape).astype(np.float32)
    if type_name == "F16":
        return raw.view("<f2").reshape(shape).astype(np.float32)
    if type_name == "BF16":
        u = raw.view("<u2").astype(np.uint32) << 16
        return u.view(np.float32).reshape(shape)
    if type_name in ("Q8_0", "Q4_0", "Q4_1"):
        b = blocks(raw, type_name, shape)
        scale = b["scale"].astype(np.float32)[..., None]
        if type_name == "Q8_0":
            w = b["qs"].astype(np.float32) * scale
        elif type_name == "Q4_0":
            w = (b["qs"].astype(np.float32) - 8.0) * scale
        else:
            w = b["qs"].astype(np.float32) * scale + b["min"].astype(np.float32)[..., None]
        return w.reshape(shape)
    raise UnsupportedTensorType(
        f"tensor {name!r} has ggml type {type_name}; supported: {', '.join(SUPPORTED_TYPES)}. "
        "Use a GGUF quantized as Q4_0, Q4_1, Q8_0 or F16")
