"""The one small interface every transport implements (httpcore NetworkBackend style).

A `Stream` pushes received bytes into a `StreamHandler` the way asyncio's
BufferedProtocol does (`get_buffer` / `buffer_updated`), so the encrypted channel can
receive a large record straight into its final buffer. Writes take a list of buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Protocol, Sequence

Address = tuple[str, int]


class StreamHandler(Protocol):
    def get_buffer(self, sizehint: int) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


def feed(handler: StreamHandler, data: Any) -> None:
    """Push bytes into a handler through its buffers (for transports that receive whole chunks)."""
    view = memoryview(data).cast("B")
    while view.nbytes:
        buf = handler.get_buffer(view.nbytes)
        n = min(len(buf), view.nbytes)
        buf[:n] = view[:n]
        view = view[n:]
        handler.buffer_updated(n)


class Stream(ABC):
    """A reliable, ordered byte stream to one peer."""

    peer_address: Address
    lossy: bool = False  # may whole writes vanish (simulated loss)? then counters may skip

    @abstractmethod
    def set_handler(self, handler: StreamHandler) -> None:
        """Deliver received bytes (including any that arrived before) to `handler`."""

    @abstractmethod
    def write(self, parts: Sequence[Any]) -> None:
        """Queue buffers for sending, in order, without copying them where possible."""

    @abstractmethod
    async def drain(self) -> None:
        """Wait until the write buffer is below its high-water mark."""

    @abstractmethod
    def write_buffer_size(self) -> int: ...

    @abstractmethod
    def pause_reading(self) -> None: ...

    @abstractmethod
    def resume_reading(self) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Flush what is queued, then close."""

    @abstractmethod
    def abort(self) -> None:
        """Close at once, dropping what is queued."""

    @property
    @abstractmethod
    def closed(self) -> bool: ...


class Listener(ABC):
    address: Address

    @abstractmethod
    def close(self) -> None: ...


class Transport(ABC):
    """Dials and listens. `TcpTransport` for real networks, `MemoryNetwork` transports for tests."""

    @abstractmethod
    async def connect(self, host: str, port: int) -> Stream:
        """Open a stream to a listener; raises OSError (e.g. ConnectionRefusedError) on failure."""

    @abstractmethod
    async def listen(self, host: str, port: int, on_stream: Callable[[Stream], None]) -> Listener:
        """Accept streams at (host, port); port 0 picks a free one (see `Listener.address`)."""
