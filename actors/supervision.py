"""Erlang-style supervisors: restart crashed children, escalate past the restart intensity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .actor import Actor, Context
from .log import get_logger

if TYPE_CHECKING:
    from .actor import Cell

log = get_logger("actors.supervision")


class Escalated(Exception):
    """A supervisor gave up: its children crashed more often than its restart intensity allows."""


@dataclass
class ChildSpec:
    """A child: a registered name and a factory that builds a fresh actor on each (re)start."""

    name: str
    factory: Callable[[], Any]
    mailbox_size: int = 1000


class Supervisor(Actor):
    """Starts `children` in order and restarts them when they crash.

    strategy "one_for_one" restarts only the crashed child; "one_for_all" restarts
    every child (in order) because the group only works together. More than
    `max_restarts` restarts within `within` seconds: the supervisor stops its
    children and fails itself, so its own parent decides (escalation). A top-level
    supervisor that escalates stops for good (watchers get Terminated).
    """

    def __init__(
        self,
        children: list[ChildSpec],
        strategy: str = "one_for_one",
        max_restarts: int = 3,
        within: float = 5.0,
    ) -> None:
        if strategy not in ("one_for_one", "one_for_all"):
            raise ValueError("strategy is 'one_for_one' or 'one_for_all'")
        self.specs = children
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.within = within
        self._cells: list["Cell"] = []
        self._ctx: Context | None = None

    async def on_start(self, ctx: Context) -> None:
        self._ctx = ctx
        for spec in self.specs:  # children of an earlier incarnation of this supervisor
            old = ctx.system._cells.get(spec.name)
            if old is not None and isinstance(old.parent, Supervisor):
                old.terminate("supervisor restarted")
        self._cells = [
            ctx.system._spawn_cell(spec.factory, spec.name, spec.mailbox_size, parent=self)
            for spec in self.specs
        ]
        self._history: list[float] = []

    async def receive(self, msg: Any, ctx: Context) -> Any:
        if isinstance(msg, Escalated):
            raise msg  # fail in our own task so our parent handles us
        return None

    def child_failed(self, cell: "Cell", exc: BaseException) -> None:
        now = cell.system.clock.now()
        self._history = [t for t in self._history if now - t < self.within]
        if len(self._history) >= self.max_restarts:
            log.error("supervisor.escalates", supervisor=self._ctx.name if self._ctx else "?", child=cell.name,
                      restarts=len(self._history), within=self.within)
            for c in reversed(self._cells):
                c.terminate("supervisor escalated")
            self._cells = []
            if self._ctx is not None:
                self._ctx._cell.deliver_system(Escalated(f"child {cell.name!r} crashed too often: {exc!r}"))
            return
        self._history.append(now)
        if self.strategy == "one_for_one":
            cell.restart()
        else:
            for c in self._cells:
                c.halt()
            for c in self._cells:
                c.restart()

    async def on_stop(self, ctx: Context) -> None:
        for c in reversed(self._cells):
            c.terminate("supervisor stopped")
