"""Actors, refs and the per-actor cell: a bounded mailbox served by one task."""

from __future__ import annotations

import asyncio
import inspect
from typing import TYPE_CHECKING, Any, Callable

from .envelopes import Terminated
from .errors import ActorDead, MailboxFull
from .log import get_logger

if TYPE_CHECKING:
    from .supervision import Supervisor
    from .system import ActorSystem

log = get_logger("actors.actor")
_STOP = object()
Reply = Callable[[bool, Any], None]  # (ok, value or exception)


class Actor:
    """Subclass and implement `receive`. Its return value answers an `ask`."""

    async def on_start(self, ctx: "Context") -> None:
        """Called in the actor's task before its first message (and after each restart)."""

    async def receive(self, msg: Any, ctx: "Context") -> Any:
        raise NotImplementedError

    async def on_stop(self, ctx: "Context") -> None:
        """Called when the actor stops gracefully."""


class ActorRef:
    """Location-transparent address of an actor: the same calls reach local and remote actors."""

    __slots__ = ("system", "node_id", "name")

    def __init__(self, system: "ActorSystem", node_id: str, name: str) -> None:
        self.system, self.node_id, self.name = system, node_id, name

    @property
    def path(self) -> str:
        return f"{self.node_id}/{self.name}"

    @property
    def is_local(self) -> bool:
        return self.node_id == self.system.node_id

    def tell(self, msg: Any, sender: "ActorRef | None" = None) -> None:
        """Fire and forget. Raises ActorDead (local target gone) or MailboxFull; a remote
        target whose node is unreachable drops the message (logged at debug)."""
        self.system._tell(self, msg, sender)

    async def send(self, msg: Any, sender: "ActorRef | None" = None) -> None:
        """Like tell, but waits for room in the mailbox / the peer's send buffer (backpressure)."""
        await self.system._send(self, msg, sender)

    async def ask(self, msg: Any, timeout: float = 5.0) -> Any:
        """Send and await the handler's return value. Raises AskTimeout, ActorDead,
        PeerUnreachable, or HandlerError when the handler raised."""
        return await self.system._ask(self, msg, timeout)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorRef) and (self.node_id, self.name) == (other.node_id, other.name)

    def __hash__(self) -> int:
        return hash((self.node_id, self.name))

    def __repr__(self) -> str:
        return f"ActorRef({self.path})"


class Context:
    """What a handler knows about its situation."""

    def __init__(self, cell: "Cell") -> None:
        self._cell = cell
        self.system = cell.system
        self.self_ref = ActorRef(cell.system, cell.system.node_id, cell.name)
        self.sender: ActorRef | None = None
        # The node id the current message arrived from, as authenticated by the link's
        # handshake; None for a message sent on this node. Never a field the remote chose.
        self.peer: str | None = None

    @property
    def name(self) -> str:
        return self._cell.name

    def watch(self, ref: ActorRef) -> None:
        """Deliver `Terminated(node_id, name, reason)` to this actor when `ref` stops for good."""
        cell = self._cell
        self.system.watch(ref, lambda t: cell.deliver_system(t))

    def stop(self) -> None:
        """Stop this actor gracefully after the message being handled and those queued."""
        self._cell.stop()


class Cell:
    def __init__(
        self,
        system: "ActorSystem",
        name: str,
        factory: Callable[[], Any],
        mailbox_size: int,
        parent: "Supervisor | None",
        max_restarts: int,
        within: float,
    ) -> None:
        self.system, self.name, self.factory, self.parent = system, name, factory, parent
        self.mailbox: asyncio.Queue[Any] = asyncio.Queue(mailbox_size)
        self.max_restarts, self.within = max_restarts, within
        self.restarts: list[float] = []
        self.state = "new"  # new, running, stopping, dead
        self.watchers: list[Callable[[Terminated], None]] = []
        self.actor: Any = None
        self.task: asyncio.Task[None] | None = None

    # ---- delivery ----------------------------------------------------------------
    def put_nowait(self, msg: Any, reply: Reply | None, sender: ActorRef | None, peer: str | None = None) -> None:
        if self.state in ("stopping", "dead"):
            raise ActorDead(f"actor {self.name!r} is {self.state}")
        try:
            self.mailbox.put_nowait((msg, reply, sender, peer))
        except asyncio.QueueFull:
            raise MailboxFull(f"mailbox of {self.name!r} is full ({self.mailbox.maxsize}); slow down or use send()") from None

    async def put(self, msg: Any, reply: Reply | None, sender: ActorRef | None, peer: str | None = None) -> None:
        if self.state in ("stopping", "dead"):
            raise ActorDead(f"actor {self.name!r} is {self.state}")
        await self.mailbox.put((msg, reply, sender, peer))

    def deliver_system(self, msg: Any) -> None:
        """Runtime notifications (Terminated) wait for room rather than fail."""
        if self.state in ("stopping", "dead"):
            return
        try:
            self.mailbox.put_nowait((msg, None, None, None))
        except asyncio.QueueFull:
            asyncio.get_running_loop().create_task(self.mailbox.put((msg, None, None, None)))

    # ---- life cycle ----------------------------------------------------------------
    def start(self) -> None:
        self.actor = self.factory()
        self.state = "running"
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"actor:{self.name}")

    async def _run(self) -> None:
        ctx = Context(self)
        actor = self.actor
        try:
            await _maybe(actor.on_start(ctx))
        except Exception as exc:
            self._crashed(exc)
            return
        mailbox = self.mailbox
        while True:
            if self.state == "stopping" and mailbox.empty():
                break
            item = await mailbox.get()
            if item is _STOP:
                continue
            msg, reply, sender, peer = item
            ctx.sender, ctx.peer = sender, peer
            try:
                result = actor.receive(msg, ctx)
                if inspect.isawaitable(result):
                    result = await result
            except asyncio.CancelledError:
                if reply is not None:
                    reply(False, ActorDead(f"actor {self.name!r} was restarted while handling the message"))
                raise
            except Exception as exc:
                if reply is not None:
                    reply(False, exc)
                self._crashed(exc)
                return
            if reply is not None:
                reply(True, result)
        try:
            await _maybe(actor.on_stop(ctx))
        except Exception as exc:
            log.warning("actor.stop_failed", actor=self.name, error=repr(exc))
        self.terminate("stopped")

    def _crashed(self, exc: BaseException) -> None:
        log.error("actor.crashed", actor=self.name, node=self.system.node_id, error=f"{type(exc).__name__}: {exc}")
        if self.state == "dead":
            return
        if self.parent is not None:
            self.parent.child_failed(self, exc)
        else:
            self.system._root_failed(self, exc)

    def allow_restart(self) -> bool:
        """Record a restart; False when it would exceed max_restarts within `within` seconds."""
        now = self.system.clock.now()
        self.restarts = [t for t in self.restarts if now - t < self.within]
        if len(self.restarts) >= self.max_restarts:
            return False
        self.restarts.append(now)
        return True

    def restart(self) -> None:
        """Fresh actor from the factory, same name and mailbox (queued messages survive)."""
        if self.state == "dead":
            return
        self.halt()
        log.info("actor.restarted", actor=self.name, node=self.system.node_id)
        self.start()

    def halt(self) -> None:
        """Cancel the actor's task (no on_stop): used by supervisors."""
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    def stop(self) -> None:
        if self.state in ("running", "new"):
            self.state = "stopping"
            if self.mailbox.empty():
                self.mailbox.put_nowait(_STOP)

    def terminate(self, reason: str) -> None:
        """Dead for good: fail queued asks, tell watchers, unregister."""
        if self.state == "dead":
            return
        self.halt()
        self.state = "dead"
        while not self.mailbox.empty():
            item = self.mailbox.get_nowait()
            if item is not _STOP and item[1] is not None:
                item[1](False, ActorDead(f"actor {self.name!r} stopped before handling the message: {reason}"))
        self.system._unregister(self)
        note = Terminated(self.system.node_id, self.name, reason)
        watchers, self.watchers = self.watchers, []
        for w in watchers:
            try:
                w(note)
            except Exception as exc:
                log.warning("actor.watcher_failed", actor=self.name, error=repr(exc))


async def _maybe(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value
