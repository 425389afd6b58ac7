"""TCP transport: asyncio BufferedProtocol (uvloop when installed), TCP_NODELAY."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable, Sequence

from .base import Address, Listener, Stream, StreamHandler, Transport, feed


class _TcpStream(Stream, asyncio.BufferedProtocol):
    """`on_made` (a listener's) is called from `connection_made`, once the stream has its
    transport and peer address: a stream handed over earlier could not be aborted (its
    `abort()` found no transport, and the connection stayed open)."""

    def __init__(self, on_made: Callable[[Stream], None] | None = None) -> None:
        self._on_made = on_made
        self.transport: asyncio.Transport | None = None
        self.peer_address: Address = ("", 0)
        self._handler: StreamHandler | None = None
        self._early = bytearray()
        self._tmp = bytearray(65536)
        self._lost = False
        self._lost_exc: Exception | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # asyncio protocol side
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer_address = (str(peer[0]), int(peer[1]))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        if self._on_made is not None:
            on_made, self._on_made = self._on_made, None
            on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._handler is not None:
            return self._handler.get_buffer(sizehint)
        return memoryview(self._tmp)

    def buffer_updated(self, nbytes: int) -> None:
        if self._handler is not None:
            self._handler.buffer_updated(nbytes)
        else:
            self._early += self._tmp[:nbytes]

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost, self._lost_exc = True, exc
        self._wake(exc or ConnectionResetError("connection closed"))
        if self._handler is not None:
            self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake(None)

    def _wake(self, exc: Exception | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_exception(exc) if exc else w.set_result(None)

    # Stream side
    def set_handler(self, handler: StreamHandler) -> None:
        self._handler = handler
        if self._early:
            early, self._early = self._early, bytearray()
            feed(handler, early)
        if self._lost:
            handler.connection_lost(self._lost_exc)

    def write(self, parts: Sequence[Any]) -> None:
        if self.transport is None or self._lost or self.transport.is_closing():
            raise ConnectionResetError("stream is closed")
        self.transport.writelines(parts)

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("stream is closed")
        if self._write_paused:
            fut = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(fut)
            await fut

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport else 0

    def pause_reading(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def closed(self) -> bool:
        return self._lost or self.transport is None or self.transport.is_closing()


class _TcpListener(Listener):
    def __init__(self, server: asyncio.AbstractServer) -> None:
        self._server = server
        sock = server.sockets[0]
        host, port = sock.getsockname()[:2]
        self.address = (str(host), int(port))

    def close(self) -> None:
        self._server.close()


class TcpTransport(Transport):
    """Real TCP. Install uvloop's policy (`actors.run` does) for lower latency."""

    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout

    async def connect(self, host: str, port: int) -> Stream:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(loop.create_connection(_TcpStream, host, port), self.connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectionRefusedError(f"connecting to {host}:{port} timed out") from None
        return proto  # type: ignore[return-value]

    async def listen(self, host: str, port: int, on_stream: Callable[[Stream], None]) -> Listener:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _TcpStream(on_stream), host, port, reuse_address=True)
        return _TcpListener(server)
