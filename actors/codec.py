"""Sans-IO frame codec: messages in -> buffers out, bytes in -> messages out. No sockets.

A message becomes *parts*: one prefix and one raw buffer per tensor.

    prefix  = u16 n_tensors | n_tensors x u64 tensor_len | msgpack header
    header  = the message, msgpack; a registered message is ExtType(1, [type, [fields]]),
              a tensor is ExtType(2, [index, kind, dtype, shape, byteorder])
    tensors = the raw bytes of each tensor, in index order (views, never copied)

On a byte stream (`encode_frame`, `FrameDecoder`) a frame is `u32 len | prefix | tensors`.
The encrypted channel (`actors.secure`) sends each part as its own record instead.

Every limit is checked before memory is committed to it; every failure is a
`CodecError` subclass, after which the connection that sent the bytes is closed.

The decoder's work is bounded too, not only its input: every array, map and message
record counts one, and its elements count one each, toward `max_total_items`, counted
as msgpack builds them (hooks), so a header of millions of empty maps stops at the
limit instead of building them all and walking them again in `check_depth`. A message
or tensor record counts RECORD_COST: building one runs Python (field checks, __init__),
about 30 times the cost of a container msgpack builds in C.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import msgpack

from . import messages, tensors
from .errors import CodecError, FrameTooLarge, LimitExceeded

EXT_MESSAGE = 1
EXT_TENSOR = 2
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_NO_TENSORS = _U16.pack(0)
RECORD_COST = 32  # items one message or tensor record counts toward max_total_items


@dataclass(frozen=True)
class Limits:
    """Hard limits of one connection. Everything a peer sends is checked against them."""

    max_frame_size: int = 256 * 1024 * 1024  # whole message, tensors included
    max_header_size: int = 4 * 1024 * 1024  # the msgpack part
    max_depth: int = 32
    max_str_len: int = 1024 * 1024
    max_bin_len: int = 4 * 1024 * 1024
    max_items: int = 65536  # per array / map
    max_total_items: int = 131072  # containers + their elements in one message, all levels
    max_tensors: int = 64


DEFAULT_LIMITS = Limits()


class _Encoder:
    """Packs one message at a time, reusing one msgpack Packer per nesting level.

    `msgpack.packb` builds a Packer (with a 256 KiB buffer) per call, and a message
    nests a packb per registered message and per tensor, which was most of the cost
    of a small message. Encoders come from a pool, so concurrent or nested encodes
    (another thread, a `default` that encodes) each get their own.
    """

    __slots__ = ("buffers", "depth", "packers")

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []
        self.depth = 0
        self.packers: list[msgpack.Packer] = []

    def pack(self, obj: Any) -> bytes:
        depth = self.depth
        if depth == len(self.packers):
            self.packers.append(msgpack.Packer(default=self.default, use_bin_type=True))
        self.depth = depth + 1
        try:
            return self.packers[depth].pack(obj)
        finally:
            self.depth = depth

    def default(self, obj: Any) -> Any:
        name = messages.type_name(obj)
        if name is not None:
            return msgpack.ExtType(EXT_MESSAGE, self.pack([name, messages.field_values(obj)]))
        if tensors.is_tensor(obj):
            header, view = tensors.to_wire(obj)
            self.buffers.append(view)
            return msgpack.ExtType(EXT_TENSOR, self.pack([len(self.buffers) - 1, *header]))
        if isinstance(obj, tuple):
            return list(obj)
        raise CodecError(f"cannot encode {type(obj).__name__}: register it with @message or use plain types")


_ENCODERS: list[_Encoder] = []


def encode(msg: Any, limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    """Encode a message into parts: [prefix bytes, tensor view, ...]. Tensors are not copied."""
    encoder = _ENCODERS.pop() if _ENCODERS else _Encoder()
    try:
        header = encoder.pack(msg)
    except CodecError:
        raise  # the encoder is dropped: a failed pack may leave a packer half-filled
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode message: {exc}") from None
    buffers, encoder.buffers = encoder.buffers, []
    _ENCODERS.append(encoder)
    if len(header) > limits.max_header_size:
        raise LimitExceeded(f"message header of {len(header)} bytes exceeds {limits.max_header_size}")
    if len(buffers) > limits.max_tensors:
        raise LimitExceeded(f"{len(buffers)} tensors exceed the limit of {limits.max_tensors}")
    if not buffers:
        prefix = _NO_TENSORS + header
        if len(prefix) > limits.max_frame_size:
            raise FrameTooLarge(f"message of {len(prefix)} bytes exceeds the frame limit {limits.max_frame_size}")
        return [prefix]
    total = 2 + 8 * len(buffers) + len(header) + sum(b.nbytes for b in buffers)
    if total > limits.max_frame_size:
        raise FrameTooLarge(f"message of {total} bytes exceeds the frame limit {limits.max_frame_size}")
    prefix = b"".join([_U16.pack(len(buffers)), *(_U64.pack(b.nbytes) for b in buffers), header])
    return [prefix, *buffers]


def parse_prefix(prefix: Any, limits: Limits = DEFAULT_LIMITS) -> tuple[list[int], memoryview]:
    """Split a prefix into (tensor lengths, header view); checks the counts and sizes."""
    view = memoryview(prefix)
    if len(view) < 2:
        raise CodecError("frame prefix is truncated")
    (count,) = _U16.unpack_from(view, 0)
    if count > limits.max_tensors:
        raise LimitExceeded(f"{count} tensors exceed the limit of {limits.max_tensors}")
    end = 2 + 8 * count
    if len(view) < end:
        raise CodecError("frame prefix is truncated")
    sizes = [_U64.unpack_from(view, 2 + 8 * i)[0] for i in range(count)]
    if len(view) - end > limits.max_header_size:
        raise LimitExceeded(f"message header exceeds {limits.max_header_size} bytes")
    if sum(sizes) + len(view) > limits.max_frame_size:
        raise FrameTooLarge(f"message exceeds the frame limit {limits.max_frame_size}")
    return sizes, view[end:]


def decode(prefix: Any, buffers: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode parts back into a message; tensors view `buffers` without copying."""
    sizes, header = parse_prefix(prefix, limits)
    if len(sizes) != len(buffers) or any(len(b) != s for b, s in zip(buffers, sizes)):
        raise CodecError("tensor buffers do not match the frame prefix")
    used = [False] * len(buffers)
    depth = [0]
    budget = [limits.max_total_items]

    def spend(container: Any) -> Any:
        budget[0] -= len(container) + 1
        if budget[0] < 0:
            raise LimitExceeded(f"message holds more than {limits.max_total_items} items")
        return container

    options = {**_unpack_options(limits), "list_hook": spend, "object_hook": spend}

    def ext_hook(code: int, data: bytes) -> Any:
        depth[0] += 1
        budget[0] -= RECORD_COST
        try:
            if budget[0] < 0:
                raise LimitExceeded(f"message holds more than {limits.max_total_items} items")
            if depth[0] > limits.max_depth:
                raise LimitExceeded(f"message nesting deeper than {limits.max_depth}")
            body = _unpack(data, ext_hook, options)
            if code == EXT_MESSAGE:
                if not (isinstance(body, list) and len(body) == 2 and isinstance(body[0], str)):
                    raise CodecError("malformed message record")
                return messages.build(body[0], body[1], limits.max_depth, depth[0])
            if code == EXT_TENSOR:
                if not (isinstance(body, list) and len(body) == 5 and type(body[0]) is int):
                    raise CodecError("malformed tensor record")
                index = body[0]
                if not 0 <= index < len(buffers) or used[index]:
                    raise CodecError(f"bad tensor index {index}")
                used[index] = True
                return tensors.from_wire(body[1:], buffers[index])
            raise CodecError(f"unknown extension type {code}")
        finally:
            depth[0] -= 1

    msg = _unpack(header, ext_hook, options)
    if not all(used):
        raise CodecError("frame carries tensors that the message does not reference")
    if isinstance(msg, (list, dict)):
        messages.check_depth(msg, limits.max_depth, 0)
    return msg


def _unpack(data: Any, ext_hook: Any, options: dict[str, Any]) -> Any:
    try:
        return msgpack.unpackb(data, ext_hook=ext_hook, **options)
    except CodecError:
        raise
    except RecursionError:
        raise LimitExceeded("message nesting too deep") from None
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData, UnicodeDecodeError) as exc:
        raise CodecError(f"malformed message: {type(exc).__name__}: {exc}") from None


@lru_cache(maxsize=64)
def _unpack_options(limits: Limits) -> dict[str, Any]:
    return {
        "raw": False,
        "strict_map_key": False,
        "use_list": True,
        "max_str_len": limits.max_str_len,
        "max_bin_len": limits.max_bin_len,
        "max_array_len": limits.max_items,
        "max_map_len": limits.max_items,
        "max_ext_len": limits.max_header_size,
    }


def encode_frame(msg: Any, limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    """Parts for a byte stream: [u32 length, prefix, tensors...]; write them with writelines."""
    parts = encode(msg, limits)
    total = sum(memoryview(p).nbytes for p in parts)
    return [_U32.pack(total), *parts]


class FrameDecoder:
    """Bytes in, messages out, for a plain byte stream of `encode_frame` frames.

    Memory is bounded by one frame: a length above `max_frame_size` fails at once.
    After any error the decoder stays failed: close the connection.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buf = bytearray()
        self._error: CodecError | None = None

    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_message(self) -> Any:
        """The next complete message, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except CodecError as exc:
            self._error = exc
            self._buf = bytearray()
            raise

    def _next(self) -> Any:
        if len(self._buf) < 4:
            return None
        (length,) = _U32.unpack_from(self._buf, 0)
        if length > self.limits.max_frame_size + 2:
            raise FrameTooLarge(f"frame of {length} bytes exceeds the limit {self.limits.max_frame_size}")
        if len(self._buf) < 4 + length:
            return None
        frame = bytes(self._buf[4 : 4 + length])
        del self._buf[: 4 + length]
        view = memoryview(frame)
        sizes, header = parse_prefix(view, self.limits)
        start = length - sum(sizes)
        if start < 2 + 8 * len(sizes):
            raise CodecError("tensor lengths exceed the frame")
        buffers = []
        for size in sizes:
            buffers.append(view[start : start + size])
            start += size
        return decode(view[: length - sum(sizes)], buffers, self.limits)
