"""A safetensors reader for Hugging Face model directories (single file or sharded).

Format: 8-byte little-endian header length, a JSON header mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end
of the header), then the data. Files are memory-mapped; a tensor's bytes are
read only when asked for.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class SafetensorsError(ValueError):
    """A safetensors file or index is missing, truncated or corrupt."""


_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8",
           "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class SafeTensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype name ("F32", "BF16", ...)
    shape: tuple[int, ...]
    offset: int  # absolute offset in the file
    nbytes: int


class SafetensorsDir:
    """All tensors of a directory's ``*.safetensors`` files, by name."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise SafetensorsError(f"{index}: corrupt index ({exc})") from exc
            files = sorted({self.directory / f for f in weight_map.values()})
        else:
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise SafetensorsError(f"{self.directory}: no *.safetensors files")
        self.tensors: dict[str, SafeTensorInfo] = {}
        self._maps: dict[Path, np.memmap] = {}
        for f in files:
            self._read_header(f)

    def _read_header(self, path: Path) -> None:
        try:
            mm = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise SafetensorsError(f"{path}: cannot map file ({exc})") from exc
        if len(mm) < 8:
            raise SafetensorsError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", bytes(mm[:8]))
        if n > MAX_HEADER or 8 + n > len(mm):
            raise SafetensorsError(f"{path}: corrupt safetensors header length {n}")
        try:
            header = json.loads(bytes(mm[8:8 + n]))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({exc})") from exc
        self._maps[path] = mm
        base = 8 + n
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if base + end > len(mm) or entry["dtype"] not in _DTYPES:
                raise SafetensorsError(f"{path}: tensor {name!r} is truncated or has "
                                       f"unsupported dtype {entry['dtype']}")
            self.tensors[name] = SafeTensorInfo(name, path, entry["dtype"], tuple(entry["shape"]),
                                                base + begin, end - begin)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 memmap view (no copy)."""
        info = self.tensors[name]
        return self._maps[info.file][info.offset:info.offset + info.nbytes]

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32 (floating dtypes) in its stored shape."""
        info = self.tensors[name]
        raw = self.raw(name)
        if info.dtype == "BF16":
            return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
        arr = raw.view(_DTYPES[info.dtype]).reshape(info.shape)
        return arr.astype(np.float32) if arr.dtype.kind == "f" else np.array(arr)
