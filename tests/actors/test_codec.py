"""Codec properties: exact round trips; arbitrary or hostile bytes only ever raise CodecError."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from actors import codec, message, registered_types
from actors.codec import FrameDecoder, Limits
from actors.errors import CodecError, FrameTooLarge, LimitExceeded, MessageFieldError, UnknownMessageType


@message("test.Leaf")
@dataclass
class Leaf:
    n: int
    label: str = ""


@message("test.Node")
@dataclass
class Node:
    name: str
    children: list[Leaf] = field(default_factory=list)
    meta: dict[str, float] = field(default_factory=dict)
    blob: bytes | None = None
    flag: bool = False
    tensor: np.ndarray | None = None


def _frame_bytes(msg: Any, limits: Limits = codec.DEFAULT_LIMITS) -> bytes:
    return b"".join(bytes(memoryview(p).cast("B")) for p in codec.encode_frame(msg, limits))


def _roundtrip(msg: Any, limits: Limits = codec.DEFAULT_LIMITS) -> Any:
    dec = FrameDecoder(limits)
    dec.receive_data(_frame_bytes(msg, limits))
    out = dec.next_message()
    assert dec.next_message() is None
    return out


scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=50) | st.binary(max_size=50)
plain = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=20)
NP_DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64", ">i4", ">f8", ">f2"]
arrays = st.sampled_from(NP_DTYPES).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
)
leaves = st.builds(Leaf, st.integers(-1000, 1000), st.text(max_size=20))
nodes = st.builds(
    Node, st.text(max_size=20), st.lists(leaves, max_size=4),
    st.dictionaries(st.text(max_size=5), st.floats(allow_nan=False), max_size=3),
    st.none() | st.binary(max_size=100), st.booleans(), st.none() | arrays,
)


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@given(plain)
def test_plain_values_roundtrip(value: Any) -> None:
    assert _roundtrip(value) == value


@given(arrays)
def test_numpy_tensors_roundtrip_exactly(arr: np.ndarray) -> None:
    out = _roundtrip({"t": arr})["t"]
    assert isinstance(out, np.ndarray) and _same_array(out, arr)


@given(nodes)
def test_registered_messages_roundtrip(node: Node) -> None:
    out = _roundtrip(node)
    assert type(out) is Node and out.name == node.name and out.children == node.children
    assert out.meta == node.meta and out.blob == node.blob and out.flag == node.flag
    assert (out.tensor is None) == (node.tensor is None)
    if node.tensor is not None:
        assert _same_array(out.tensor, node.tensor)


def _sample(hint):
    """A valid value for a field annotation (every registered type, whoever registered it)."""
    import types
    import typing

    plain = {int: 7, str: "s", bytes: b"b", float: 0.5, bool: True, np.ndarray: np.arange(3.0)}
    if hint in plain:
        return plain[hint]
    if isinstance(hint, str):  # a forward reference to a registered message class
        return _build(next(c for c in registered_types().values() if c.__name__ == hint.split(".")[-1]))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return None if type(None) in args else _sample(args[0])
    if origin in (list, tuple):
        return [_sample(args[0])] if args and args[0] is not typing.Any else [1, "x"]
    if origin is dict:
        return {"k": _sample(args[1])} if args else {"k": 1}
    if hint in (list, dict, typing.Any, object):
        return {"list": [1, "x"], "dict": {"k": 1}}.get(getattr(hint, "__name__", ""), 1)
    if getattr(hint, "__message_type__", None):
        return _build(hint)
    raise AssertionError(f"no sample for {hint!r}: extend _sample")


def _build(cls):
    from actors.messages import fields_of

    return cls(**{f: _sample(h) for f, h, has_default in fields_of(cls) if not has_default})


def test_every_registered_type_roundtrips_with_defaults() -> None:
    """Every message type registered in this process — the runtime's own and, when the
    whole suite runs, the mesh's — encodes and decodes to an equal message."""
    from actors import envelopes  # noqa: F401  (registers the runtime's own types)
    from actors.messages import fields_of

    for name, cls in registered_types().items():
        msg = _build(cls)
        out = _roundtrip(msg)
        assert type(out) is cls, name
        for (fname, _, _) in fields_of(cls):
            a, b = getattr(out, fname), getattr(msg, fname)
            assert (np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b), (name, fname)


TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (5,), (2, 3, 4)])
def test_torch_tensors_roundtrip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = (torch.arange(int(np.prod(shape)) if shape else 1) % 7).reshape(shape).to(dtype)
    out = _roundtrip([t])[0]
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out, t)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int32", "uint8", "bool"])
def test_mlx_arrays_roundtrip(dtype: str) -> None:
    mx = pytest.importorskip("mlx.core")
    a = (mx.arange(12) % 5).reshape(3, 4).astype(getattr(mx, "bool_" if dtype == "bool" else dtype))
    out = _roundtrip({"a": a})["a"]
    assert type(out).__module__.startswith("mlx") and out.dtype == a.dtype and out.shape == a.shape
    assert mx.array_equal(out, a).item()


def test_received_tensor_views_the_buffer_without_copying() -> None:
    arr = np.arange(1000, dtype=np.float32)
    parts = codec.encode({"a": arr})
    assert parts[1].obj is not None and np.shares_memory(np.asarray(parts[1]), arr)  # sent as a view
    buf = bytearray(parts[1])
    out = codec.decode(parts[0], [memoryview(buf)])["a"]
    assert np.shares_memory(out, np.frombuffer(buf, np.uint8))


def test_unknown_type_and_wrong_fields_are_typed_errors() -> None:
    frame = _frame_bytes(Leaf(1, "x"))
    dec = FrameDecoder()
    dec.receive_data(frame.replace(b"test.Leaf", b"test.Lea?"))
    with pytest.raises(UnknownMessageType):
        dec.next_message()
    for fields in ([1, 2], [1, "x", 3], [], "not a list"):  # wrong type, extra, missing, malformed
        header = msgpack.packb(msgpack.ExtType(1, msgpack.packb(["test.Leaf", fields])))
        with pytest.raises(MessageFieldError):
            codec.decode(b"\x00\x00" + header, [])
    with pytest.raises(CodecError):
        codec.encode(object())


def test_limits_are_enforced() -> None:
    limits = Limits(max_frame_size=1024, max_depth=5, max_str_len=10, max_tensors=2)
    with pytest.raises(FrameTooLarge):
        codec.encode(np.zeros(1000), limits)
    deep: Any = 1
    for _ in range(10):
        deep = [deep]
    with pytest.raises(LimitExceeded):
        codec.decode(*_split(codec.encode(deep)), limits=limits)
    with pytest.raises(CodecError):
        codec.decode(*_split(codec.encode("x" * 11)), limits=limits)
    with pytest.raises(LimitExceeded):
        codec.encode([np.zeros(1)] * 3, limits)
    dec = FrameDecoder(limits)
    dec.receive_data(struct.pack("<I", 10**9))
    with pytest.raises(FrameTooLarge):
        dec.next_message()
    assert dec.buffered == 0  # nothing of the oversized frame was kept


def _split(parts: list[Any]) -> tuple[Any, list[Any]]:
    return parts[0], parts[1:]


def _feed_all(data: bytes, limits: Limits = codec.DEFAULT_LIMITS) -> None:
    dec = FrameDecoder(limits)
    try:
        dec.receive_data(data)
        while dec.next_message() is not None:
            pass
    except CodecError:
        pass
    assert dec.buffered <= len(data)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_codec_errors(data: bytes) -> None:
    _feed_all(data)
    _feed_all(struct.pack("<I", len(data)) + data)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(nodes, st.data())
def test_truncated_and_mutated_frames_raise_only_codec_errors(node: Node, data: st.DataObject) -> None:
    frame = _frame_bytes(node)
    cut = data.draw(st.integers(0, len(frame)))
    _feed_all(frame[:cut])
    mutated = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(frame) - 1))
        mutated[i] = data.draw(st.integers(0, 255))
    _feed_all(bytes(mutated), Limits(max_frame_size=1 << 20))
