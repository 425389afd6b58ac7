"""GGUF files through the ``gguf`` library (the reader maintained with llama.cpp).

``gguf.GGUFReader`` parses the header, the metadata and the tensor infos and memory-maps
the data; ``gguf.quants.dequantize`` turns any block type it knows into float32. This
module adds only what mesh needs around them:

- one parse per process per file version (``open_gguf``), shared by the config, the
  tokenizer and every stage load, and that parse about 4x faster than the library's own
  (``_Reader``: the same fields and tensors, read without numpy's memmap subclass);
- tensor infos in numpy order with their byte ranges, so a stage reads only its own
  tensors (the memmap pages in nothing else);
- errors that are typed and say what to do, where the library raises bare
  ``ValueError``/``IndexError`` on a truncated, corrupt or unknown file.

Tensor dims are stored innermost first (ggml ``ne``); ``TensorInfo.shape`` is the numpy
order (outermost first), and ``raw`` gives a quantized tensor as ``(rows, row_bytes)``.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """The file is not a readable GGUF file (bad magic, truncated, corrupt)."""


class UnsupportedTensorType(GGUFError):
    """A tensor uses a ggml type that the gguf library cannot dequantize."""


@cache
def dequantizable(type_name: str) -> bool:
    """Whether ``gguf.quants.dequantize`` handles this ggml type (probed on one block)."""
    qtype = gguf.GGMLQuantizationType[type_name]
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def supported_types() -> list[str]:
    """Every ggml type mesh can load (the ones the gguf library dequantizes)."""
    return [t.name for t in gguf.GGMLQuantizationType if dequantizable(t.name)]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: ``shape`` is numpy order (outermost first)."""

    name: str
    shape: tuple[int, ...]
    type_name: str  # ggml type, e.g. "Q4_K"
    offset: int  # absolute offset of the first byte in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def block_size(self) -> int:
        """Elements per quantization block (1 for float types)."""
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.type_name]][0]


class _Reader(gguf.GGUFReader):
    """``gguf.GGUFReader`` with its one primitive, ``_get`` (a typed view of ``count`` items
    at ``offset``), done on a plain ndarray view of the memmap with the byte-ordered dtypes
    made once. The library calls ``_get`` about four times per vocabulary entry, and each
    slice of an ``np.memmap`` runs the subclass's ``__getitem__`` and ``__array_finalize__``
    in Python: that was three quarters of opening a file with a 262k vocabulary (7.3 s
    against 1.7 s for gemma-3-270m here). The views still share the file's mapping, and
    the fields and tensors are the library's own (tests/kernels/test_gguf.py compares them)."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
        cache = self.__dict__.get("_views")
        if cache is None:
            cache = self.__dict__["_views"] = {"data": self.data.view(np.ndarray)}
        order = self.byte_order if override_order is None else override_order
        dt = cache.get((dtype, order))
        if dt is None:
            dt = cache[(dtype, order)] = np.dtype(dtype).newbyteorder(order)
        count = int(count)
        return cache["data"][offset:offset + dt.itemsize * count].view(dt)


def _reader_class() -> type[gguf.GGUFReader]:
    """``_Reader`` while the library's ``_get`` is the primitive it replaces; else the library's."""
    params = list(inspect.signature(gguf.GGUFReader._get).parameters)
    return _Reader if params == ["self", "offset", "dtype", "count", "override_order"] else gguf.GGUFReader


_OPEN: dict[tuple[str, int, int], GGUFFile] = {}
_OPEN_KEEP = 2  # a node serves one model; an auditor or a test may hold a second


def open_gguf(path: str | Path) -> GGUFFile:
    """An opened GGUFFile, parsed once per process per file version (path, size, mtime):
    the config, the tokenizer and every stage load of a node share one parse."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise GGUFError(f"{path}: cannot open ({exc.strerror})") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    gf = _OPEN.pop(key, None)
    if gf is None:
        gf = GGUFFile(path)
        while len(_OPEN) >= _OPEN_KEEP:
            _OPEN.pop(next(iter(_OPEN)))  # the least recently opened
    _OPEN[key] = gf
    return gf


_UNKNOWN_TYPE = re.compile(r"(\d+)\)? is not a valid GGMLQuantizationType")


class GGUFFile:
    """An opened GGUF file: ``metadata`` (plain Python values), ``tensors`` (TensorInfo by name).

    ``raw(name)`` returns the tensor's bytes as a memmap view (nothing is read until
    used); ``dequantize(name)`` a float32 array in numpy shape.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._check_prefix()
        try:
            reader = _reader_class()(self.path)
        except ValueError as exc:
            unknown = _UNKNOWN_TYPE.search(str(exc))
            if unknown:
                raise UnsupportedTensorType(
                    f"{self.path}: a tensor has ggml type id {unknown.group(1)}, which the gguf library "
                    f"{_gguf_version()} does not know; use a GGUF quantized as Q4_K_M, Q8_0 or F16, "
                    "or upgrade the gguf package") from None
            raise self._corrupt(exc) from None
        except (IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
            raise self._corrupt(exc) from None
        self.version = int(reader.fields["GGUF.version"].contents())
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if not key.startswith("GGUF."):
                try:
                    self.metadata[key] = field.contents()
                except (UnicodeDecodeError, IndexError, ValueError) as exc:
                    raise GGUFError(f"{self.path}: corrupt metadata value {key!r} ({exc}); "
                                    "re-download the model file") from None
        size = len(reader.data)
        self.tensors: dict[str, TensorInfo] = {}
        self._data: dict[str, np.ndarray] = {}
        for t in reader.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if t.data_offset + t.n_bytes > size:
                raise GGUFError(f"{self.path}: truncated: tensor {t.name!r} ends at byte "
                                f"{t.data_offset + t.n_bytes} but the file has {size}; re-download the model file")
            self.tensors[t.name] = TensorInfo(t.name, shape, t.tensor_type.name, int(t.data_offset), int(t.n_bytes))
            self._data[t.name] = t.data

    def _check_prefix(self) -> None:
        """Bad magic or version, named before the library's generic errors."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
        except OSError as exc:
            raise GGUFError(f"{self.path}: cannot open ({exc.strerror})") from None
        if len(head) < 8:
            raise GGUFError(f"{self.path}: truncated GGUF header ({len(head)} bytes); re-download the model file")
        if head[:4] != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic)")
        version = int.from_bytes(head[4:8], "little")
        if version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {version} (need 2 or 3)")

    def _corrupt(self, exc: Exception) -> GGUFError:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return GGUFError(f"{self.path}: truncated or corrupt GGUF ({detail}); re-download the model file")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, uint8 ``(*shape[:-1], row_bytes)``, a view of the memmap."""
        data = self._data[name]
        info = self.tensors[name]
        return data.view(np.uint8).reshape(*info.shape[:-1], -1)

    def check_type(self, name: str) -> None:
        """Raise UnsupportedTensorType if the library cannot dequantize this tensor."""
        info = self.tensors[name]
        if not dequantizable(info.type_name):
            raise UnsupportedTensorType(
                f"{self.path}: tensor {name!r} has ggml type {info.type_name}, which mesh cannot load; "
                f"use a GGUF quantized as Q4_K_M, Q8_0 or F16 (supported: {', '.join(supported_types())})")

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy shape (outermost dim first), a copy."""
        self.check_type(name)
        info = self.tensors[name]
        qtype = gguf.GGMLQuantizationType[info.type_name]
        out = gguf.quants.dequantize(self._data[name], qtype)
        return np.array(out, dtype=np.float32).reshape(info.shape)


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Bytes of ``type_name`` blocks (rows of ``row_bytes``) to float32 of ``shape``."""
    if not dequantizable(type_name):
        raise UnsupportedTensorType(f"ggml type {type_name} cannot be dequantized by the gguf library")
    qtype = gguf.GGMLQuantizationType[type_name]
    data = np.ascontiguousarray(raw).view(np.uint8)
    if type_name in ("F32", "F16"):  # the library views these by their own dtype
        data = data.view(np.float32 if type_name == "F32" else np.float16)
    return np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(shape)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"
