"""Tensors on the wire: a small header (kind, dtype, shape, byte order) plus the raw buffer.

Sending never copies a contiguous array: `to_wire` returns a flat uint8 memoryview of
the array's own memory. Receiving views the (decrypted) buffer in place with
`np.frombuffer`; torch tensors share that memory too (`torch.from_numpy`). MLX arrays
are copied once into MLX (MLX cannot adopt foreign memory). bfloat16 needs no
ml_dtypes: torch and MLX bfloat16 travel as their 16-bit patterns.

Sending a torch or MLX tensor imports its module lazily (the sender holds one, so it is
loaded). Receiving never imports anything: a peer's frame chooses the tensor kind, and
importing torch costs seconds and hundreds of MiB. A torch/MLX tensor arrives as torch/MLX
only if this process has already loaded that module, else as the numpy array it views.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Any

import numpy as np

from .errors import CodecError, LimitExceeded

# dtype name -> (numpy dtype used for the bytes, itemsize)
DTYPES: dict[str, tuple[str, int]] = {
    "bool": ("bool", 1),
    "int8": ("i1", 1),
    "uint8": ("u1", 1),
    "int16": ("i2", 2),
    "uint16": ("u2", 2),
    "int32": ("i4", 4),
    "uint32": ("u4", 4),
    "int64": ("i8", 8),
    "uint64": ("u8", 8),
    "float16": ("f2", 2),
    "bfloat16": ("u2", 2),  # bit pattern; the receiver re-views it as bfloat16
    "float32": ("f4", 4),
    "float64": ("f8", 8),
}
KINDS = ("np", "torch", "mlx")
MAX_NDIM = 32
_NATIVE = "<" if sys.byteorder == "little" else ">"


def is_tensor(value: Any) -> bool:
    """True for numpy arrays and, when their modules are loaded, torch/MLX arrays."""
    if isinstance(value, np.ndarray):
        return True
    mod = type(value).__module__
    return mod.startswith("torch") and type(value).__name__ == "Tensor" or (
        mod.startswith("mlx") and type(value).__name__ == "array"
    )


def _flat_bytes(arr: np.ndarray) -> memoryview:
    if arr.flags.c_contiguous and arr.size:  # the common case, without three numpy calls
        return memoryview(arr).cast("B")
    arr = np.ascontiguousarray(arr)  # no copy when already contiguous
    return memoryview(arr.reshape(-1).view(np.uint8))


_NP_WIRE: dict[np.dtype, tuple[str, str]] = {}  # numpy dtype -> (wire dtype name, byte order)


def _np_wire(dtype: np.dtype) -> tuple[str, str]:
    cached = _NP_WIRE.get(dtype)
    if cached is not None:
        return cached
    name = dtype.name
    if name not in DTYPES or dtype.kind == "V":
        raise CodecError(f"numpy dtype {dtype} cannot travel; use one of {sorted(DTYPES)}")
    order = dtype.byteorder
    order = _NATIVE if order in ("=", "|") else order
    if dtype.itemsize == 1:
        order = "|"
    _NP_WIRE[dtype] = (name, order)
    return name, order


def to_wire(value: Any) -> tuple[list[Any], memoryview]:
    """Return ([kind, dtype, shape, byteorder], raw bytes view) for a tensor."""
    if isinstance(value, np.ndarray):
        name, order = _np_wire(value.dtype)
        return ["np", name, list(value.shape), order], _flat_bytes(value)
    mod = type(value).__module__
    if mod.startswith("torch"):
        import torch

        t = value.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise CodecError(f"torch dtype {t.dtype} cannot travel; use one of {sorted(DTYPES)}")
        shape = list(t.shape)
        if name == "bfloat16":
            t = t.view(torch.int16)
        arr = t.numpy()
        return ["torch", name, shape, "|" if arr.dtype.itemsize == 1 else _NATIVE], _flat_bytes(arr)
    if mod.startswith("mlx"):
        import mlx.core as mx

        mx.eval(value)
        name = str(value.dtype).removeprefix("mlx.core.")
        if name not in DTYPES:
            raise CodecError(f"mlx dtype {value.dtype} cannot travel; use one of {sorted(DTYPES)}")
        shape = list(value.shape)
        src = value.view(mx.uint16) if name == "bfloat16" else value
        arr = np.array(src, copy=False)
        return ["mlx", name, shape, "|" if arr.dtype.itemsize == 1 else _NATIVE], _flat_bytes(arr)
    raise CodecError(f"{type(value).__name__} is not a tensor")


def check_header(header: Any) -> tuple[str, str, tuple[int, ...], str, int]:
    """Validate a tensor header from the wire; return (kind, dtype, shape, order, nbytes)."""
    if not (isinstance(header, list) and len(header) == 4):
        raise CodecError("tensor header must be [kind, dtype, shape, byteorder]")
    kind, name, shape, order = header
    if kind not in KINDS:
        raise CodecError(f"unknown tensor kind {kind!r}")
    if name not in DTYPES:
        raise CodecError(f"unknown tensor dtype {name!r}")
    if order not in ("<", ">", "|"):
        raise CodecError(f"bad tensor byte order {order!r}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise LimitExceeded(f"tensor shape must be a list of at most {MAX_NDIM} dims")
    count = 1
    for dim in shape:
        if type(dim) is not int or dim < 0 or dim > 1 << 48:
            raise CodecError(f"bad tensor dimension {dim!r}")
        count *= dim
        if count > 1 << 48:
            raise LimitExceeded("tensor has too many elements")
    itemsize = DTYPES[name][1]
    if order == "|" and itemsize != 1 or order != "|" and itemsize == 1:
        raise CodecError(f"byte order {order!r} does not fit dtype {name}")
    return kind, name, tuple(shape), order, count * itemsize


def from_wire(header: Any, buf: Any) -> Any:
    """Build the tensor that `header` describes over `buf` (no copy for numpy/torch)."""
    kind, name, shape, order, nbytes = check_header(header)
    if len(buf) != nbytes:
        raise CodecError(f"tensor buffer holds {len(buf)} bytes, header says {nbytes}")
    arr = np.frombuffer(buf, dtype=_wire_dtype(name, order)).reshape(shape)
    if kind == "np":
        if name == "bfloat16":
            return _np_bfloat16(arr, shape)
        return arr
    if order not in ("|", _NATIVE):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if kind == "torch":
        return _to_torch(arr, name)
    return _to_mlx(arr, name)


@lru_cache(maxsize=None)  # at most len(DTYPES) x 3 byte orders, checked by check_header
def _wire_dtype(name: str, order: str) -> np.dtype:
    np_code, _ = DTYPES[name]
    return np.dtype(np_code if order == "|" or name == "bool" else order + np_code)


def _loaded(module: str) -> Any:
    """The module if this process has imported it already, else None (never imports)."""
    return sys.modules.get(module)


def _np_bfloat16(arr: np.ndarray, shape: tuple[int, ...]) -> Any:
    ml_dtypes = _loaded("ml_dtypes")  # optional: only when this process uses it too
    if ml_dtypes is not None:
        return arr.view(ml_dtypes.bfloat16)
    return _to_torch(arr.astype(arr.dtype.newbyteorder("=")), "bfloat16")


def _to_torch(arr: np.ndarray, name: str) -> Any:
    torch = _loaded("torch")
    if torch is None:
        if name == "bfloat16":
            raise CodecError("a bfloat16 tensor arrived but neither torch nor ml_dtypes is loaded here") from None
        return arr
    if not arr.flags.writeable:
        arr = arr.copy()  # torch cannot share read-only memory
    if name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _to_mlx(arr: np.ndarray, name: str) -> Any:
    mx = _loaded("mlx.core")
    if mx is None:
        return _to_torch(arr, name) if name == "bfloat16" else arr
    if name == "bfloat16":
        return mx.array(arr).view(mx.bfloat16)
    return mx.array(arr)
