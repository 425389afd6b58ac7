"""Sans-IO encrypted channel: AEAD records (AES-256-GCM or ChaCha20-Poly1305) with counters.

    record = u32 ciphertext_len | u64 counter | ciphertext (plaintext + 16-byte tag)
    nonce  = direction (4 bytes) | counter (u64 LE); the 12-byte record header is the AAD

Each part of an encoded message (prefix, then one per tensor) is one record, so a
tensor is encrypted in one pass straight from its own memory and decrypted in place
into one buffer that `np.frombuffer` then views. A counter that is not above the last
one accepted is a replay (or reorder) and raises `ReplayError`; on a reliable stream
the counter must be exactly the next one. Any tampering raises `DecryptError`.

The cipher is the one the handshake negotiated (`actors.ciphers`); both seal into
and open into our own buffers, so no record is copied on the way in or out. Each
direction has its own key and its own 4-byte direction tag in the nonce, and a counter
is never reused within a direction, so no (key, nonce) pair ever repeats.
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

from . import ciphers, codec
from .codec import Limits
from .errors import CodecError, DecryptError, FrameTooLarge, ReplayError

TAG = ciphers.TAG
HEADER = struct.Struct("<IQ")
_COUNTER = struct.Struct("<Q")
SMALL = 64 * 1024  # records up to this size are sent as one joined buffer
SCRATCH = 256 * 1024


class SecureChannel:
    """Seals outgoing message parts into records and opens incoming records into messages."""

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        send_direction: bytes,
        recv_direction: bytes,
        limits: Limits = codec.DEFAULT_LIMITS,
        allow_gaps: bool = False,
        cipher: str = ciphers.CHACHA,
    ) -> None:
        if len(send_key) != 32 or len(recv_key) != 32 or len(send_direction) != 4 or len(recv_direction) != 4:
            raise ValueError("keys are 32 bytes, directions 4 bytes")
        self.limits = limits
        self.allow_gaps = allow_gaps
        self.cipher = cipher
        self._sealer = ciphers.make(cipher, send_key)
        self._opener = ciphers.make(cipher, recv_key)
        self._send_dir, self._recv_dir = send_direction, recv_direction
        self._send_counter = 0
        self._recv_counter = 0  # last accepted; the first record is 1
        # receive state
        self._scratch = bytearray(SCRATCH)
        self._scratch_view = memoryview(self._scratch)
        self._start = 0
        self._end = 0
        self._big: bytearray | None = None
        self._big_header = (0, 0)
        self._big_filled = 0
        self._prefix: Any = None
        self._sizes: list[int] = []
        self._tensors: list[Any] = []
        self._ready: list[Any] = []
        self._error: Exception | None = None
        self.records_received = 0

    # ---- sending -------------------------------------------------------------
    def seal(self, parts: Sequence[Any]) -> list[Any]:
        """Encrypt message parts (from `codec.encode`) into buffers to write, in order."""
        out: list[Any] = []
        seal = self._sealer.seal_into
        for part in parts:
            view = memoryview(part)
            n = view.nbytes
            if n > self.limits.max_frame_size:
                raise FrameTooLarge(f"record of {n} bytes exceeds the frame limit")
            self._send_counter += 1
            header = HEADER.pack(n + TAG, self._send_counter)
            nonce = self._send_dir + _COUNTER.pack(self._send_counter)
            if n + TAG <= SMALL:
                record = bytearray(12 + n + TAG)
                record[:12] = header
                seal(memoryview(record)[12:], view, header, nonce)
                out.append(record)
            else:
                sealed = bytearray(n + TAG)
                seal(sealed, view, header, nonce)
                out.append(header)
                out.append(sealed)
        return out

    def send(self, msg: Any) -> list[Any]:
        """Encode and seal one message."""
        return self.seal(codec.encode(msg, self.limits))

    # ---- receiving -----------------------------------------------------------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A buffer for the next incoming bytes (BufferedProtocol style)."""
        if self._big is not None:
            return memoryview(self._big)[self._big_filled :]
        if self._end == SCRATCH:
            pending = self._end - self._start
            self._scratch[:pending] = self._scratch_view[self._start : self._end]
            self._start, self._end = 0, pending
        return self._scratch_view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were written into the last buffer from `get_buffer`."""
        if self._error is not None:
            raise self._error
        try:
            if self._big is not None:
                self._big_filled += nbytes
                if self._big_filled == len(self._big):
                    big, self._big = self._big, None
                    self._open(*self._big_header, memoryview(big), owned=big)
                return
            self._end += nbytes
            self._parse_scratch()
        except Exception as exc:
            self._error = exc
            raise

    def receive_data(self, data: Any) -> None:
        """Feed bytes (copies them into the channel's buffers)."""
        view = memoryview(data).cast("B")
        while view.nbytes:
            buf = self.get_buffer()
            n = min(len(buf), view.nbytes)
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def next_message(self) -> Any:
        """The next complete message, or None. Raises after a failure (close the connection)."""
        if self._error is not None and not self._ready:
            raise self._error
        return self._ready.pop(0) if self._ready else None

    def take_ready(self) -> list[Any]:
        """All complete messages so far, without raising (the failure was raised by the feed)."""
        ready, self._ready = self._ready, []
        return ready

    def _parse_scratch(self) -> None:
        view = self._scratch_view
        while self._end - self._start >= 12:
            length, counter = HEADER.unpack_from(self._scratch, self._start)
            self._check_header(length, counter)
            body_start = self._start + 12
            available = self._end - body_start
            if available >= length:
                self._start = body_start + length
                self._open(length, counter, view[body_start : self._start])
                continue
            if length > SCRATCH - 12:
                big = bytearray(length)
                big[:available] = view[body_start : self._end]
                self._big, self._big_header, self._big_filled = big, (length, counter), available
                self._start = self._end = 0
            return
        if self._start == self._end:
            self._start = self._end = 0

    def _check_header(self, length: int, counter: int) -> None:
        if length < TAG or length - TAG > self.limits.max_frame_size:
            raise FrameTooLarge(f"record of {length} bytes is outside the limits")
        if counter <= self._recv_counter:
            raise ReplayError(f"record counter {counter} is not above {self._recv_counter}: replayed or reordered")
        if counter != self._recv_counter + 1 and not self.allow_gaps:
            raise ReplayError(f"record counter {counter} skips past {self._recv_counter + 1}: records were dropped or reordered")

    def _open(self, length: int, counter: int, cipher: Any, owned: bytearray | None = None) -> None:
        header = HEADER.pack(length, counter)
        nonce = self._recv_dir + _COUNTER.pack(counter)
        n = length - TAG
        target = memoryview(owned)[:n] if owned is not None else bytearray(n)  # big records decrypt in place
        if not self._opener.open_into(target, cipher, header, nonce):
            raise DecryptError(f"record {counter} failed authentication: altered in transit or wrong key")
        self._recv_counter = counter
        self.records_received += 1
        self._on_record(memoryview(target))

    def _on_record(self, plain: memoryview) -> None:
        if self._prefix is None:
            sizes, _ = codec.parse_prefix(plain, self.limits)
            self._prefix, self._sizes, self._tensors = plain, sizes, []
        else:
            expected = self._sizes[len(self._tensors)]
            if plain.nbytes != expected:
                raise CodecError(f"tensor record of {plain.nbytes} bytes, prefix announced {expected}")
            self._tensors.append(plain)
        if len(self._tensors) == len(self._sizes):
            prefix, tensors = self._prefix, self._tensors
            self._prefix, self._sizes, self._tensors = None, [], []
            self._ready.append(codec.decode(prefix, tensors, self.limits))
