"""One authenticated, encrypted connection: the asyncio adapter around Handshake + SecureChannel."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from .clock import LOOP_CLOCK, Clock
from .codec import Limits
from .envelopes import Ping
from .errors import ActorsError, HandshakeError, PeerUnreachable
from .handshake import Handshake, HandshakeResult, ReplayGuard
from .identity import NodeIdentity
from .log import get_logger
from .secure import SecureChannel
from .transport.base import Address, Stream

log = get_logger("actors.link")


class _HandshakeSink:
    def __init__(self, link: "Link") -> None:
        self.link = link
        self.buf = bytearray(4096)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        self.link._handshake_bytes(bytes(self.buf[:nbytes]))

    def connection_lost(self, exc: Exception | None) -> None:
        self.link._handshake_lost(exc)


class Link:
    """A connection to one peer node. Calls `on_message(link, msg)` and `on_closed(link, reason)`."""

    def __init__(
        self,
        stream: Stream,
        identity: NodeIdentity,
        cluster_secret: bytes,
        initiator: bool,
        listen: Address | None,
        limits: Limits,
        on_message: Callable[["Link", Any], Any],
        on_closed: Callable[["Link", str], None],
        ciphers: tuple[str, ...] | None = None,
        clock: Clock = LOOP_CLOCK,
        replay: ReplayGuard | None = None,  # the node's guard, shared by its responder handshakes
    ) -> None:
        self.stream = stream
        self.clock = clock
        self.identity = identity
        self.initiator = initiator
        self.limits = limits
        self.on_message = on_message  # returns None, or an awaitable to finish before the next
        self.on_closed = on_closed
        self.remote_address: Address = stream.peer_address
        self.peer_id: str | None = None
        self.peer_listen: Address | None = None
        self.dialer_id: str | None = None
        self.closed = False
        self.last_received = self.clock.now()
        self.last_sent = self.clock.now()
        self._hs = Handshake(identity, cluster_secret, initiator, listen, ciphers, replay=replay)
        self._hs_done: asyncio.Future[HandshakeResult] = asyncio.get_running_loop().create_future()
        self._channel: SecureChannel | None = None
        self.cipher = ""  # negotiated by the handshake
        self._backlog: list[Any] = []  # messages held while reading is paused
        self._heartbeat: asyncio.Task[None] | None = None

    # ---- handshake -------------------------------------------------------------
    async def handshake(self, timeout: float) -> HandshakeResult:
        self.stream.set_handler(_HandshakeSink(self))
        if self.initiator:
            self._write([self._hs.start()])
        try:
            result = await asyncio.wait_for(asyncio.shield(self._hs_done), timeout)
        except asyncio.TimeoutError:
            self.stream.abort()
            raise HandshakeError(f"handshake with {self._where()} timed out after {timeout}s") from None
        self.peer_id = result.peer_node_id
        self.peer_listen = result.peer_listen
        self.cipher = result.cipher
        self.dialer_id = self.identity.node_id if self.initiator else self.peer_id
        self._channel = SecureChannel(
            result.send_key, result.recv_key, result.send_direction, result.recv_direction,
            self.limits, allow_gaps=self.stream.lossy, cipher=result.cipher,
        )
        self.stream.set_handler(self)
        if result.leftover:
            self._feed(result.leftover)
        return result

    def _where(self) -> str:
        return f"{self.remote_address[0]}:{self.remote_address[1]}"

    def _handshake_bytes(self, data: bytes) -> None:
        if self._hs_done.done():
            return
        try:
            out = self._hs.receive_data(data)
        except HandshakeError as exc:
            self._hs_done.set_exception(exc)  # before close(), whose connection_lost would also settle it
            if self._hs.farewell:
                self._write([self._hs.farewell])
            self.stream.close()
            return
        if out:
            self._write(out)
        if self._hs.result is not None:
            self._hs_done.set_result(self._hs.result)

    def _handshake_lost(self, exc: Exception | None) -> None:
        if not self._hs_done.done():
            self._hs_done.set_exception(
                HandshakeError(f"{self._where()} closed the connection during the handshake")
            )

    def _write(self, parts: list[Any]) -> None:
        try:
            self.stream.write(parts)
        except (ConnectionError, RuntimeError):
            pass

    # ---- established -----------------------------------------------------------
    def start_heartbeat(self, interval: float, timeout: float) -> None:
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(interval, timeout))

    async def _beat(self, interval: float, timeout: float) -> None:
        while not self.closed:
            await self.clock.sleep(interval / 2)
            now = self.clock.now()
            if now - self.last_received > timeout:
                self.close(f"no traffic for {timeout}s (heartbeat timeout)")
                return
            if now - self.last_sent >= interval:
                try:
                    self.send(Ping())
                except ActorsError:
                    return

    def send(self, msg: Any) -> None:
        """Encrypt and queue one message. Raises PeerUnreachable if the link is closed."""
        if self.closed or self._channel is None:
            raise PeerUnreachable(f"link to {self.peer_id} is closed")
        records = self._channel.send(msg)
        try:
            self.stream.write(records)
        except (ConnectionError, RuntimeError) as exc:
            self.close(f"write failed: {exc}")
            raise PeerUnreachable(f"link to {self.peer_id} is closed") from None
        self.last_sent = self.clock.now()

    async def drain(self) -> None:
        try:
            await self.stream.drain()
        except ConnectionError:
            raise PeerUnreachable(f"link to {self.peer_id} is closed") from None

    def write_buffer_size(self) -> int:
        return self.stream.write_buffer_size()

    # StreamHandler
    def get_buffer(self, sizehint: int) -> memoryview:
        assert self._channel is not None
        return self._channel.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        assert self._channel is not None
        self.last_received = self.clock.now()
        try:
            self._channel.buffer_updated(nbytes)
        except Exception as exc:  # typed codec/crypto errors; anything else is a bug, same cure
            self._deliver_ready()
            self._fail(exc)
            return
        self._deliver_ready()

    def _feed(self, data: bytes) -> None:
        assert self._channel is not None
        try:
            self._channel.receive_data(data)
        except Exception as exc:
            self._deliver_ready()
            self._fail(exc)
            return
        self._deliver_ready()

    def _deliver_ready(self) -> None:
        assert self._channel is not None
        ready = self._channel.take_ready()
        if self._backlog:  # reading is paused behind a full mailbox: keep order
            self._backlog.extend(ready)
            return
        for i, msg in enumerate(ready):
            if self.closed:
                return
            wait = self.on_message(self, msg)
            if wait is not None:  # the target mailbox is full: backpressure the peer
                self._backlog.extend(ready[i + 1 :])
                self.stream.pause_reading()
                asyncio.get_running_loop().create_task(self._drain_backlog(wait))
                return

    async def _drain_backlog(self, wait: Any) -> None:
        await wait
        while self._backlog and not self.closed:
            wait = self.on_message(self, self._backlog.pop(0))
            if wait is not None:
                await wait
        self.stream.resume_reading()

    def _fail(self, exc: Exception) -> None:
        log.warning(
            "link.frame_rejected", peer=self.peer_id, address=self._where(),
            error=type(exc).__name__, detail=str(exc),
        )
        self.close(f"{type(exc).__name__}: {exc}", abort=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close("connection lost" if exc is None else f"connection lost: {exc}")

    def close(self, reason: str = "closed", abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self._heartbeat is not None and self._heartbeat is not asyncio.current_task():
            self._heartbeat.cancel()
        self.stream.abort() if abort else self.stream.close()
        self.on_closed(self, reason)
