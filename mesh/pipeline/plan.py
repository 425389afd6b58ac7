"""The plan a node follows, owned in one place.

A plan is named by its `Epoch`: the coordinator's term, then the plan's version within
that term. Epochs are totally ordered, so "is this message from the plan I follow?" and
"is this plan newer than mine?" are one comparison each, and nothing else compares
``(term, version)`` by hand.

`PlanState` holds the current `PlanUpdate`, whether it is ready to serve, the term fence
every coordinator command passes, and the failovers the coordinator listed. The node
feeds it the coordinator's messages; the stage host, serving and verification read it.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any, Callable

import structlog

from mesh.cluster.bounds import ImplausibleMessage, check_plan_version
from mesh.cluster.fence import Fence
from mesh.pipeline.messages import PlanReady, PlanUpdate

log = structlog.get_logger("mesh.plan")


@dataclass(frozen=True, order=True, slots=True)
class Epoch:
    term: int
    version: int

    @classmethod
    def of(cls, msg: Any) -> "Epoch":
        """The epoch a pipeline message carries (it has ``term`` and ``version`` fields)."""
        return cls(msg.term, msg.version)

    def __str__(self) -> str:
        return f"{self.term}.{self.version}"


NO_EPOCH = Epoch(0, 0)


class Offer(enum.Enum):
    """What `PlanState.offer` made of a plan."""

    REFUSED = "refused"  # an older term (fenced) or an older plan: ignored
    SAME = "same"  # the plan this node follows, re-sent: answer it again
    NEW = "new"  # a newer plan: follow it from now on


@dataclass(frozen=True)
class PlanView:
    """What serving needs of a ready plan."""

    epoch: Epoch
    stage_nodes: list[str]


class PlanState:
    def __init__(self, fence: Fence | None = None) -> None:
        self.fence = fence if fence is not None else Fence()
        self.update: PlanUpdate | None = None
        self.ready = False
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []

    @property
    def epoch(self) -> Epoch:
        return Epoch.of(self.update) if self.update is not None else NO_EPOCH

    @property
    def failovers(self) -> list[dict]:
        return list(self.update.failovers) if self.update is not None else []

    @property
    def error(self) -> str:
        return self.update.error if self.update is not None else ""

    def is_current(self, msg: Any) -> bool:
        """Whether a pipeline message belongs to the plan this node follows."""
        return self.update is not None and Epoch.of(msg) == self.epoch

    # -- inputs -----------------------------------------------------------------------

    def offer(self, update: PlanUpdate) -> Offer:
        """A plan from a coordinator: refused if fenced, older or out of range, else followed."""
        if not self._plausible_version(update.version, update.coordinator, "PlanUpdate"):
            return Offer.REFUSED
        if not self.fence.check(update.term, src=update.coordinator, command="PlanUpdate"):
            return Offer.REFUSED
        epoch = Epoch.of(update)
        if epoch < self.epoch:
            return Offer.REFUSED
        if epoch == self.epoch:
            return Offer.SAME
        self.update = update
        self.ready = False
        self._notify()
        return Offer.NEW

    def mark_ready(self, msg: PlanReady) -> bool:
        """The coordinator says every stage of ``msg``'s plan is loaded; True if that is news."""
        if not self._plausible_version(msg.version, "", "PlanReady"):
            return False
        if not self.fence.check(msg.term, command="PlanReady"):
            return False
        if not self.is_current(msg) or self.ready:
            return False
        self.ready = True
        self._notify()
        return True

    def _plausible_version(self, version: Any, src: str, command: str) -> bool:
        current = self.update.version if self.update is not None else None
        try:
            check_plan_version(version, current)
        except ImplausibleMessage as exc:
            log.warning("plan.implausible_version", src=src, command=command, error=str(exc)[:200])
            return False
        return True

    def suspend(self) -> bool:
        """Stop serving on the current plan (cut off from the majority); True if it served."""
        if not self.ready:
            return False
        self.ready = False
        self._notify()
        return True

    # -- reading ----------------------------------------------------------------------

    def serving_view(self) -> PlanView | None:
        """The plan to send sessions into, or None while no plan is ready."""
        if self.update is None or not self.ready or not self.update.stages:
            return None
        return PlanView(self.epoch, [s.node for s in self.update.stages])

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    async def wait_changed(self, timeout: float) -> None:
        """Until the plan or its readiness changes, at most ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in list(self._listeners):
            listener()
