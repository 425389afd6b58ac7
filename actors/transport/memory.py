"""In-memory transport for deterministic tests: many nodes in one process.

    net = MemoryNetwork(delay=0.001, loss=0.0, seed=1)
    a = ActorSystem(ida, secret, transport=net.transport("a"))
    net.partition({"a"}, {"b", "c"}); net.heal(); net.crash("a"); net.revive("a")

Two modes:
- lossy (the default): each `write` is one unit for delay and loss; a lost write
  vanishes whole (the encrypted channel then sees a counter gap, which lossy streams
  allow), and a partition drops the writes across it.
- strict (``strict=True``): a stream is what TCP promises, every write arrives, in
  order, or the stream breaks; a partition aborts the streams across it, as a
  connection that times out would.
Either way a partition refuses new connections across it, and `crash` aborts every
stream of a node and refuses it until `revive`.

Delays are timers of the given clock: on an ``actors.clock.VirtualTimeLoop`` the
network runs on virtual time, and a test's outcome depends only on its seed.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import deque
from typing import Any, Callable, Sequence

from ..clock import LOOP_CLOCK, Clock
from .base import Address, Listener, Stream, StreamHandler, Transport, feed


class MemoryNetwork:
    def __init__(self, delay: float = 0.0, loss: float = 0.0, seed: int = 0, *, strict: bool = False,
                 clock: Clock = LOOP_CLOCK) -> None:
        if strict and loss:
            raise ValueError("a strict network loses nothing: loss must be 0")
        self.delay = delay
        self.loss = loss
        self.strict = strict
        self.clock = clock
        self.rng = random.Random(seed)
        self._listeners: dict[Address, tuple[str, Callable[[Stream], None]]] = {}
        self._streams: list[_MemStream] = []
        self._cut: set[frozenset[str]] = set()
        self._crashed: set[str] = set()
        self._ports = itertools.count(10000)

    def transport(self, name: str) -> "MemoryTransport":
        """The transport of the node called `name` (its host name on this network)."""
        return MemoryTransport(self, name)

    def partition(self, side_a: set[str] | list[str], side_b: set[str] | list[str]) -> None:
        for a in side_a:
            for b in side_b:
                self._cut.add(frozenset((a, b)))
        if self.strict:  # an open stream loses nothing: one across the cut breaks instead
            for stream in list(self._streams):
                if not self.reachable(stream.local, stream.remote):
                    stream.abort()

    def heal(self) -> None:
        self._cut.clear()

    def crash(self, name: str) -> None:
        """The node vanishes: its streams break, its listeners stop, it is unreachable."""
        self._crashed.add(name)
        for addr in [a for a, (owner, _) in self._listeners.items() if owner == name]:
            del self._listeners[addr]
        for stream in list(self._streams):
            if name in (stream.local, stream.remote):
                stream.abort()

    def revive(self, name: str) -> None:
        self._crashed.discard(name)

    def reachable(self, a: str, b: str) -> bool:
        return a not in self._crashed and b not in self._crashed and frozenset((a, b)) not in self._cut

    def _listen(self, name: str, host: str, port: int, on_stream: Callable[[Stream], None]) -> Address:
        if port == 0:
            port = next(self._ports)
        addr = (host or name, port)
        if addr in self._listeners:
            raise OSError(f"address {addr} already in use")
        self._listeners[addr] = (name, on_stream)
        return addr

    def _connect(self, name: str, host: str, port: int) -> Stream:
        entry = self._listeners.get((host, port))
        if entry is None or not self.reachable(name, entry[0]):
            raise ConnectionRefusedError(f"{host}:{port} refused the connection")
        owner, on_stream = entry
        ours = _MemStream(self, name, owner, (host, port))
        theirs = _MemStream(self, owner, name, (name, 0))
        ours.other, theirs.other = theirs, ours
        self._streams += [ours, theirs]
        asyncio.get_running_loop().call_soon(on_stream, theirs)
        return ours


class _MemStream(Stream):
    def __init__(self, net: MemoryNetwork, local: str, remote: str, peer_address: Address) -> None:
        self.net, self.local, self.remote, self.peer_address = net, local, remote, peer_address
        self.lossy = not net.strict
        self.other: _MemStream | None = None
        self._handler: StreamHandler | None = None
        self._inbox: list[bytes] = []
        self._paused = False
        self._closed = False
        self._lost_notified = False
        self._in_flight: deque[tuple[float, Callable[[], Any]]] = deque()  # (due, delivery), in write order
        self._timer: asyncio.TimerHandle | None = None

    def set_handler(self, handler: StreamHandler) -> None:
        self._handler = handler
        self._flush()

    def write(self, parts: Sequence[Any]) -> None:
        if self._closed:
            raise ConnectionResetError("stream is closed")
        data = b"".join(bytes(memoryview(p).cast("B")) if not isinstance(p, bytes) else p for p in parts)
        if not self.net.reachable(self.local, self.remote) or (self.net.loss and self.net.rng.random() < self.net.loss):
            return
        self._schedule(lambda: self.other and self.other._receive(data))

    def _schedule(self, fn: Callable[[], Any]) -> None:
        if self.net.delay <= 0:
            asyncio.get_running_loop().call_soon(fn)
            return
        # One timer per stream, delivering what is due in write order: timers due at the
        # same instant may fire in any order, and a stream must not reorder.
        self._in_flight.append((self.net.clock.now() + self.net.delay, fn))
        if self._timer is None:
            self._timer = self.net.clock.call_later(self.net.delay, self._deliver_due)

    def _deliver_due(self) -> None:
        self._timer = None
        now = self.net.clock.now()
        while self._in_flight and self._in_flight[0][0] <= now:
            self._in_flight.popleft()[1]()
        if self._in_flight:
            self._timer = self.net.clock.call_later(self._in_flight[0][0] - now, self._deliver_due)

    def _receive(self, data: bytes) -> None:
        if self._closed:
            return
        self._inbox.append(data)
        self._flush()

    def _flush(self) -> None:
        while self._inbox and self._handler is not None and not self._paused and not self._closed:
            feed(self._handler, self._inbox.pop(0))

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("stream is closed")

    def write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        self._paused = False
        self._flush()

    def close(self) -> None:
        if self._closed:
            return
        other = self.other
        self._schedule(lambda: other and other._lose(None))
        self._lose(None)

    def abort(self) -> None:
        if self._closed:
            return
        self._lose(ConnectionResetError("connection aborted"))
        if self.other is not None:
            self.other._lose(ConnectionResetError("connection reset by peer"))

    def _lose(self, exc: Exception | None) -> None:
        if self._lost_notified:
            return
        self._closed = self._lost_notified = True
        if self in self.net._streams:
            self.net._streams.remove(self)
        if self._handler is not None:
            self._handler.connection_lost(exc)

    @property
    def closed(self) -> bool:
        return self._closed


class _MemListener(Listener):
    def __init__(self, net: MemoryNetwork, address: Address) -> None:
        self.net, self.address = net, address

    def close(self) -> None:
        self.net._listeners.pop(self.address, None)


class MemoryTransport(Transport):
    def __init__(self, net: MemoryNetwork, name: str) -> None:
        self.net, self.name = net, name

    async def connect(self, host: str, port: int) -> Stream:
        await asyncio.sleep(0)
        return self.net._connect(self.name, host, port)

    async def listen(self, host: str, port: int, on_stream: Callable[[Stream], None]) -> Listener:
        return _MemListener(self.net, self.net._listen(self.name, self.name, port, on_stream))
