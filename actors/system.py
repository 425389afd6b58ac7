"""ActorSystem: local actors, links to peer nodes, routing of tells/asks/replies, peer events."""

from __future__ import annotations

import asyncio
import itertools
import random
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from . import envelopes as env
from .actor import ActorRef, Cell
from .admission import HandshakeGate
from .ciphers import check_names as check_ciphers
from .clock import LOOP_CLOCK, Clock
from .codec import DEFAULT_LIMITS, Limits
from .errors import (
    ActorDead, ActorsError, AskTimeout, ClusterSecretMismatch, CodecError, HandlerError,
    HandshakeError, HelloRefused, MailboxFull, PeerUnreachable,
)
from .handshake import ReplayGuard
from .identity import NodeIdentity
from .link import Link
from .log import get_logger
from .transport.base import Address, Listener, Stream, Transport

log = get_logger("actors.system")
_ERRORS: dict[str, type[ActorsError]] = {
    "ActorDead": ActorDead, "MailboxFull": MailboxFull, "CodecError": CodecError,
}


@dataclass(frozen=True)
class PeerEvent:
    """A peer node came up (first link established) or went down (last link lost)."""

    node_id: str
    address: Address  # where the peer listens (or its socket address if it did not say)
    up: bool
    reason: str = ""


class ActorSystem:
    """One node of the actor runtime. See the `actors` package docstring for a tour."""

    def __init__(
        self,
        identity: NodeIdentity,
        cluster_secret: bytes,
        transport: Transport | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        mailbox_size: int = 1000,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 5.0,
        handshake_timeout: float = 5.0,
        reconnect: bool = True,
        backoff: tuple[float, float] = (0.05, 5.0),
        max_send_buffer: int = 64 * 1024 * 1024,
        ciphers: tuple[str, ...] | None = None,
        clock: Clock = LOOP_CLOCK,
        rng: random.Random | None = None,
        max_pending_handshakes: int = 64,
    ) -> None:
        if not cluster_secret:
            raise ValueError("the cluster secret must not be empty")
        from .transport.tcp import TcpTransport

        self.identity = identity
        self.clock = clock
        self._rng = rng or random.Random()  # redial jitter; seeded for deterministic tests
        self.node_id = identity.node_id
        self.transport = transport or TcpTransport()
        self.limits = limits
        self.mailbox_size = mailbox_size
        self.heartbeat_interval, self.heartbeat_timeout = heartbeat_interval, heartbeat_timeout
        self.handshake_timeout = handshake_timeout
        self.reconnect, self.backoff = reconnect, backoff
        self.max_send_buffer = max_send_buffer
        self.ciphers = check_ciphers(ciphers) if ciphers else None  # None: `ciphers.supported()`
        self.address: Address | None = None
        self._secret = cluster_secret
        self._gate = HandshakeGate(max_pending_handshakes, clock=clock)  # before authentication
        self._replay = ReplayGuard()
        self._listener: Listener | None = None
        self._cells: dict[str, Cell] = {}
        self._links: dict[str, Link] = {}
        self._all_links: set[Link] = set()
        self._dialed: dict[Address, str | None] = {}  # addresses to keep connected -> node id
        self._redialing: set[Address] = set()
        self._asks: dict[int, tuple[asyncio.Future[Any], str]] = {}
        self._ask_ids = itertools.count(1)
        self._remote_watchers: dict[tuple[str, str], list[Callable[[env.Terminated], None]]] = {}
        self._peer_callbacks: list[Callable[[PeerEvent], Any]] = []
        self._event_queues: list[asyncio.Queue[PeerEvent]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._anon = itertools.count(1)
        self._stopped = False
        self.log = log.bind(node=self.node_id)

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Address:
        """Listen for peers; port 0 picks a free port (see `address`)."""
        self._listener = await self.transport.listen(host, port, self._accept)
        self.address = self._listener.address
        self.log.info("system.started", address=f"{self.address[0]}:{self.address[1]}")
        return self.address

    async def stop(self) -> None:
        """Stop actors (gracefully, with a short grace), close links and the listener."""
        self._stopped = True
        if self._listener is not None:
            self._listener.close()
        cells = list(self._cells.values())
        for cell in cells:
            cell.stop()
        tasks = [c.task for c in cells if c.task is not None and not c.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for cell in cells:
            cell.terminate("system stopped")
        for link in list(self._all_links):
            link.close("system stopped")
        for task in list(self._tasks):
            task.cancel()
        for fut, _ in list(self._asks.values()):
            if not fut.done():
                fut.set_exception(PeerUnreachable("actor system stopped"))
        self._asks.clear()
        await asyncio.sleep(0)

    # ---- actors ----------------------------------------------------------------------
    def spawn(
        self,
        actor: Any,
        name: str | None = None,
        *,
        mailbox_size: int | None = None,
        max_restarts: int = 3,
        within: float = 5.0,
    ) -> ActorRef:
        """Start an actor. `actor` is an instance (reused on restart) or a zero-argument
        factory/class (a fresh instance per restart). A crash restarts it, at most
        `max_restarts` times within `within` seconds; then it stops for good."""
        factory = actor if callable(actor) and not hasattr(actor, "receive") or isinstance(actor, type) else (lambda: actor)
        cell = self._spawn_cell(factory, name, mailbox_size, parent=None, max_restarts=max_restarts, within=within)
        return ActorRef(self, self.node_id, cell.name)

    def _spawn_cell(self, factory: Callable[[], Any], name: str | None, mailbox_size: int | None,
                    parent: Any, max_restarts: int = 3, within: float = 5.0) -> Cell:
        if self._stopped:
            raise ActorDead("the actor system is stopped")
        name = name or f"$anon{next(self._anon)}"
        if "/" in name and parent is None and name.startswith(self.node_id):
            raise ValueError("actor names must not start with a node id")
        if name in self._cells:
            raise ValueError(f"an actor named {name!r} already runs on this node")
        cell = Cell(self, name, factory, mailbox_size or self.mailbox_size, parent, max_restarts, within)
        self._cells[name] = cell
        cell.start()
        return cell

    def ref(self, node_id: str, name: str) -> ActorRef:
        """A ref to actor `name` on node `node_id` (this node or a peer)."""
        return ActorRef(self, node_id, name)

    async def stop_actor(self, ref: ActorRef, timeout: float = 5.0) -> None:
        """Stop a local actor gracefully: it handles what is queued, then on_stop runs."""
        cell = self._cells.get(ref.name)
        if cell is None or not ref.is_local:
            return
        cell.stop()
        if cell.task is not None:
            await asyncio.wait([cell.task], timeout=timeout)
        cell.terminate("stopped")

    def watch(self, ref: ActorRef, callback: Callable[[env.Terminated], None]) -> None:
        """Call `callback(Terminated)` once when the actor stops for good (or its node goes down)."""
        if ref.is_local:
            cell = self._cells.get(ref.name)
            if cell is None or cell.state == "dead":
                asyncio.get_running_loop().call_soon(callback, env.Terminated(ref.node_id, ref.name, "not running"))
            else:
                cell.watchers.append(callback)
            return
        link = self._links.get(ref.node_id)
        if link is None:
            asyncio.get_running_loop().call_soon(callback, env.Terminated(ref.node_id, ref.name, "peer unreachable"))
            return
        self._remote_watchers.setdefault((ref.node_id, ref.name), []).append(callback)
        link.send(env.Watch(ref.name))

    def _unregister(self, cell: Cell) -> None:
        if self._cells.get(cell.name) is cell:
            del self._cells[cell.name]

    def _root_failed(self, cell: Cell, exc: BaseException) -> None:
        from .supervision import Escalated

        if not isinstance(exc, Escalated) and cell.allow_restart():
            cell.restart()
        else:
            cell.terminate(f"crashed: {type(exc).__name__}: {exc}")

    # ---- sending -----------------------------------------------------------------------
    def _tell(self, ref: ActorRef, msg: Any, sender: ActorRef | None) -> None:
        if ref.node_id == self.node_id:
            self._local_cell(ref).put_nowait(msg, None, sender)
            return
        link = self._links.get(ref.node_id)
        if link is None:
            self.log.debug("system.tell_dropped", to=ref.path, reason="peer unreachable")
            return
        if link.write_buffer_size() > self.max_send_buffer:
            raise MailboxFull(f"send buffer to {ref.node_id} is full; use `await ref.send()`")
        try:
            link.send(env.Tell(ref.name, msg, sender.name if sender is not None else None))
        except PeerUnreachable:
            self.log.debug("system.tell_dropped", to=ref.path, reason="link closed")

    async def _send(self, ref: ActorRef, msg: Any, sender: ActorRef | None) -> None:
        if ref.node_id == self.node_id:
            await self._local_cell(ref).put(msg, None, sender)
            return
        link = self._link_or_raise(ref.node_id)
        link.send(env.Tell(ref.name, msg, sender.name if sender is not None else None))
        await link.drain()

    async def _ask(self, ref: ActorRef, msg: Any, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if ref.node_id == self.node_id:
            cell = self._local_cell(ref)

            def reply(ok: bool, value: Any) -> None:
                if not fut.done():
                    fut.set_result(value) if ok else fut.set_exception(_as_handler_error(value))

            try:
                await asyncio.wait_for(cell.put(msg, reply, None), timeout)
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise AskTimeout(f"no reply from {ref.path} within {timeout}s") from None
        link = self._link_or_raise(ref.node_id)
        ask_id = next(self._ask_ids)
        self._asks[ask_id] = (fut, ref.node_id)
        try:
            link.send(env.Ask(ask_id, ref.name, msg))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise AskTimeout(f"no reply from {ref.path} within {timeout}s") from None
        finally:
            self._asks.pop(ask_id, None)

    def _local_cell(self, ref: ActorRef) -> Cell:
        cell = self._cells.get(ref.name)
        if cell is None or cell.state == "dead":
            raise ActorDead(f"no actor {ref.name!r} runs on node {self.node_id}")
        return cell

    def _link_or_raise(self, node_id: str) -> Link:
        link = self._links.get(node_id)
        if link is None:
            raise PeerUnreachable(f"node {node_id} is not connected; connect() first or wait for it to come back")
        return link

    # ---- peers -------------------------------------------------------------------------
    def peers(self) -> dict[str, Address]:
        """Connected peers: node id -> address."""
        return {nid: _peer_address(link) for nid, link in self._links.items()}

    def is_connected(self, node_id: str) -> bool:
        """Whether a tell to ``node_id`` can leave now: it is this node, or a link to it is up."""
        if node_id == self.node_id:
            return True
        link = self._links.get(node_id)
        return link is not None and not link.closed

    def cipher_of(self, node_id: str) -> str:
        """The record cipher negotiated with a connected peer (`actors.ciphers`)."""
        return self._link_or_raise(node_id).cipher

    def on_peer(self, callback: Callable[[PeerEvent], Any]) -> None:
        """Call `callback(PeerEvent)` on every peer up/down (coroutine results are scheduled)."""
        self._peer_callbacks.append(callback)

    async def peer_events(self) -> AsyncIterator[PeerEvent]:
        """Async stream of peer up/down events from now on."""
        queue: asyncio.Queue[PeerEvent] = asyncio.Queue(1000)
        self._event_queues.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._event_queues.remove(queue)

    def _emit(self, event: PeerEvent) -> None:
        self.log.info("link.up" if event.up else "link.down", peer=event.node_id,
                      address=f"{event.address[0]}:{event.address[1]}", reason=event.reason or None)
        for cb in list(self._peer_callbacks):
            try:
                result = cb(event)
                if asyncio.iscoroutine(result):
                    self._spawn_task(result)
            except Exception as exc:
                self.log.warning("link.callback_failed", error=repr(exc))
        for q in self._event_queues:
            if q.full():
                q.get_nowait()  # a consumer that does not keep up loses the oldest events
            q.put_nowait(event)

    async def connect(self, host: str, port: int) -> str:
        """Dial a peer and handshake; returns its node id. The address is redialed with
        exponential backoff whenever the link drops (until `disconnect` or `stop`)."""
        link = await self._dial(host, port)
        self._dialed[(host, port)] = link.peer_id
        return link.peer_id  # type: ignore[return-value]

    def disconnect(self, node_id: str) -> None:
        """Close the link to a peer and stop redialing it."""
        for addr, nid in list(self._dialed.items()):
            if nid == node_id:
                del self._dialed[addr]
        link = self._links.get(node_id)
        if link is not None:
            link.close("disconnected by us")

    async def _dial(self, host: str, port: int) -> Link:
        try:
            stream = await self.transport.connect(host, port)
        except OSError as exc:
            raise PeerUnreachable(f"cannot reach {host}:{port}: {exc}") from None
        return await self._establish(stream, initiator=True)

    def _accept(self, stream: Stream) -> None:
        host = stream.peer_address[0]
        if self._stopped or not self._gate.try_enter(host):
            stream.abort()
            return
        self._spawn_task(self._accept_task(stream, host))

    async def _accept_task(self, stream: Stream, host: str) -> None:
        try:
            await self._establish(stream, initiator=False)
        except (HandshakeError, PeerUnreachable):
            pass  # logged in _establish
        finally:
            self._gate.leave(host)

    async def _establish(self, stream: Stream, initiator: bool) -> Link:
        link = Link(stream, self.identity, self._secret, initiator, self.address, self.limits,
                    self._on_message, self._on_link_closed, self.ciphers, self.clock, self._replay)
        where = f"{stream.peer_address[0]}:{stream.peer_address[1]}"
        try:
            await link.handshake(self.handshake_timeout)
        except HelloRefused as exc:  # a stranger's or a replayed hello: cheap, and logged rate-limited
            self._gate.log_refused(self.log, exc, where)
            raise
        except ClusterSecretMismatch as exc:
            peer = link._hs.peer_node_id or "?"
            self.log.error("link.secret_mismatch", peer=peer, address=where,
                           detail=f"peer {peer} at {where} refused; check --secret-file on both machines")
            raise ClusterSecretMismatch(f"peer {peer} at {where} refused: {exc}") from None
        except HandshakeError as exc:
            self.log.warning("link.handshake_failed", address=where, error=str(exc))
            raise
        if link.peer_id == self.node_id:
            link.close("connected to ourselves")
            raise HandshakeError(f"{where} is this node itself")
        self._all_links.add(link)
        existing = self._links.get(link.peer_id)  # type: ignore[arg-type]
        if existing is not None and not existing.closed and not self._prefer(link, existing):
            link.close("duplicate connection (keeping the one dialed by the lower node id)")
            return existing
        self._links[link.peer_id] = link  # type: ignore[index]
        link.start_heartbeat(self.heartbeat_interval, self.heartbeat_timeout)
        if existing is not None and not existing.closed:
            existing.close("duplicate connection (keeping the one dialed by the lower node id)")
        else:
            self._emit(PeerEvent(link.peer_id, _peer_address(link), True))  # type: ignore[arg-type]
        return link

    def _prefer(self, new: Link, old: Link) -> bool:
        """Both ends pick the same survivor of simultaneous dials: the lower node id's dial."""
        if new.dialer_id == old.dialer_id:
            return True  # a redial replaces a stale link
        return new.dialer_id == min(self.node_id, new.peer_id)  # type: ignore[type-var]

    def _on_link_closed(self, link: Link, reason: str) -> None:
        self._all_links.discard(link)
        if link.peer_id is None or self._links.get(link.peer_id) is not link:
            return
        del self._links[link.peer_id]
        peer = link.peer_id
        for ask_id, (fut, node) in list(self._asks.items()):
            if node == peer and not fut.done():
                fut.set_exception(PeerUnreachable(f"link to {peer} lost: {reason}"))
        for (node, name), callbacks in list(self._remote_watchers.items()):
            if node == peer:
                del self._remote_watchers[(node, name)]
                for cb in callbacks:
                    cb(env.Terminated(node, name, f"peer down: {reason}"))
        self._emit(PeerEvent(peer, _peer_address(link), False, reason))
        if self._stopped or not self.reconnect:
            return
        for addr, nid in self._dialed.items():
            if nid == peer and addr not in self._redialing:
                self._spawn_task(self._redial(addr, peer))

    async def _redial(self, addr: Address, peer: str) -> None:
        self._redialing.add(addr)
        delay = self.backoff[0]
        try:
            while not self._stopped and self._dialed.get(addr) == peer and peer not in self._links:
                await self.clock.sleep(delay * (0.5 + self._rng.random()))
                if peer in self._links or self._dialed.get(addr) != peer:
                    return
                try:
                    await self._dial(*addr)
                    return
                except (PeerUnreachable, HandshakeError) as exc:
                    self.log.debug("link.redial_failed", address=f"{addr[0]}:{addr[1]}", error=str(exc), retry_in=delay)
                    delay = min(delay * 2, self.backoff[1])
        finally:
            self._redialing.discard(addr)

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- receiving ---------------------------------------------------------------------
    def _on_message(self, link: Link, msg: Any) -> Any:
        kind = type(msg)
        if kind is env.Tell:
            sender = ActorRef(self, link.peer_id, msg.sender) if msg.sender else None  # type: ignore[arg-type]
            return self._deliver(link, msg.to, msg.msg, None, sender)
        if kind is env.Ask:
            ask_id = msg.id

            def reply(ok: bool, value: Any) -> None:
                if link.closed:
                    return
                try:
                    link.send(env.Reply(ask_id, value) if ok else _failure(ask_id, value))
                except CodecError as exc:
                    link.send(env.Failure(ask_id, "CodecError", f"cannot encode the reply: {exc}"))
                except PeerUnreachable:
                    pass

            return self._deliver(link, msg.to, msg.msg, reply, None)
        if kind is env.Reply or kind is env.Failure:
            entry = self._asks.get(msg.id)
            if entry is not None and not entry[0].done() and entry[1] == link.peer_id:
                if kind is env.Reply:
                    entry[0].set_result(msg.msg)
                else:
                    err = _ERRORS.get(msg.kind)
                    entry[0].set_exception(err(msg.text) if err else HandlerError(msg.kind, msg.text))
            return None
        if kind is env.Ping:
            return None
        if kind is env.Watch:
            ref = ActorRef(self, self.node_id, msg.name)

            def notify(t: env.Terminated) -> None:
                if not link.closed:
                    link.send(t)

            self.watch(ref, notify)
            return None
        if kind is env.Terminated:
            for cb in self._remote_watchers.pop((link.peer_id, msg.name), []):  # type: ignore[arg-type]
                cb(msg)
            return None
        self.log.warning("system.unexpected_envelope", peer=link.peer_id, type=kind.__name__)
        link.close(f"unexpected envelope {kind.__name__}", abort=True)
        return None

    def _deliver(self, link: Link, name: str, msg: Any, reply: Any, sender: ActorRef | None) -> Any:
        cell = self._cells.get(name)
        if cell is None or cell.state in ("stopping", "dead"):
            if reply is not None:
                reply(False, ActorDead(f"no actor {name!r} runs on node {self.node_id}"))
            return None
        try:
            cell.put_nowait(msg, reply, sender, link.peer_id)
            return None
        except MailboxFull:
            return self._deliver_later(cell, msg, reply, sender, link.peer_id)

    async def _deliver_later(self, cell: Cell, msg: Any, reply: Any, sender: ActorRef | None, peer: str | None) -> None:
        try:
            await cell.put(msg, reply, sender, peer)
        except ActorDead as exc:
            if reply is not None:
                reply(False, exc)


def _peer_address(link: Link) -> Address:
    if link.peer_listen is not None:
        host = link.peer_listen[0]
        if host in ("0.0.0.0", "::", ""):
            host = link.remote_address[0]
        return (host, link.peer_listen[1])
    return link.remote_address


def _as_handler_error(value: Any) -> BaseException:
    if isinstance(value, ActorDead):
        return value
    return HandlerError(type(value).__name__, str(value))


def _failure(ask_id: int, value: Any) -> env.Failure:
    if isinstance(value, HandlerError):
        return env.Failure(ask_id, value.kind, value.text)
    return env.Failure(ask_id, type(value).__name__, str(value))
