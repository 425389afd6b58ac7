"""The coordinator's part of the pipeline: place the layers, tell every node, and say
when the plan is ready to serve.

It runs only on the node the election made coordinator, and every message it sends
carries its term (fencing). It re-plans when the set of live nodes changes — a stage's
node died (failover), a node joined (used by the new plan), a node failed to load —
after the membership has been quiet for a short debounce, so a burst of joins gives
one plan rather than several.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import structlog

from actors.clock import LOOP_CLOCK, Clock
from mesh.pipeline.messages import PlanReady, PlanUpdate, StageEntry, StageReady
from mesh.pipeline.plan import Epoch
from mesh.planner import InsufficientMemory, ModelProfile, NodeCapacity, Plan, plan

log = structlog.get_logger("mesh.coordinator")

Send = Callable[[str, str, object], None]


class Debounce:
    """When to re-plan, as a pure decision: every request restarts the wait with its own
    delay, so a burst of membership changes gives one plan once it has been quiet."""

    def __init__(self) -> None:
        self.due: float | None = None

    def request(self, now: float, delay: float) -> float:
        self.due = now + delay
        return self.due

    def fire(self, now: float) -> bool:
        """True once, when the wait is over."""
        if self.due is None or now < self.due - 1e-9:  # a timer may fire a rounding error early
            return False
        self.due = None
        return True

    def cancel(self) -> None:
        self.due = None


@dataclass
class PlanRecord:
    update: PlanUpdate
    started: float
    ready_nodes: set[str] = field(default_factory=set)
    ready: bool = False

    @property
    def epoch(self) -> Epoch:
        return Epoch.of(self.update)

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.update.stages]


class CoordinatorRole:
    def __init__(self, node_id: str, model: str, profile: ModelProfile, send: Send, *,
                 debounce_s: float = 0.3, failover_debounce_s: float = 0.02, max_stages: int | None = None,
                 clock: Clock = LOOP_CLOCK):
        self.node_id = node_id
        self.clock = clock
        self.model = model
        self.profile = profile
        self.send = send
        self.debounce_s = debounce_s
        self.failover_debounce_s = failover_debounce_s
        self.failovers: list[dict] = []
        self.max_stages = max_stages
        self.term = 0
        self.members: list[str] = []  # every live member (gets the plan)
        self.capacities: dict[str, NodeCapacity] = {}
        self.current: PlanRecord | None = None
        self.version = 0
        self.load_failed: dict[str, str] = {}  # node -> error; left out until it rejoins
        self._debounce = Debounce()
        self._timer: asyncio.TimerHandle | None = None
        self.active = False

    # -- activation (driven by the election) -------------------------------------------

    def take_office(self, term: int, last_known: PlanUpdate | None) -> None:
        """This node became coordinator in ``term``: continue from the last plan it knew."""
        self.active = True
        self.term = term
        if last_known is not None:
            self.version = max(self.version, last_known.version)
            self.current = PlanRecord(last_known, self.clock.now())
            self.failovers = list(last_known.failovers)
            if last_known.coordinator != self.node_id:
                self._record("coordinator", last_known.coordinator)
        log.info("coordinator.take_office", term=term, plan_version=self.version)
        self.schedule(self.failover_debounce_s)

    def step_down(self) -> None:
        self.active = False
        self._debounce.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- inputs -----------------------------------------------------------------------

    def set_members(self, capacities: list[NodeCapacity]) -> None:
        """The live members and what they offer; re-plan if the set changed."""
        new = {c.node_id: c for c in capacities}
        changed = set(new) != set(self.capacities)
        self.capacities = new
        self.members = sorted(new)
        for node in list(self.load_failed):
            if node not in new:
                del self.load_failed[node]  # it left; if it comes back, it gets another chance
        if not (changed and self.active):
            return
        lost = [n for n in (self.current.nodes if self.current else []) if n not in new]
        for node in lost:
            self._record("stage", node)
        # A lost stage stalls every session: re-plan at once. Joins wait for the burst to settle.
        self.schedule(self.failover_debounce_s if lost else self.debounce_s)

    def evict(self, node: str, reason: str) -> None:
        """Keep ``node`` out of every plan (verification flagged it); while coordinating,
        re-place its layers at once and list the eviction with the failovers."""
        self.load_failed[node] = reason
        if not self.active:
            return
        if self.current is not None and node in self.current.nodes:
            self._record("evicted", node)
        self.schedule(self.failover_debounce_s)

    def _record(self, kind: str, node: str) -> None:
        if any(f["kind"] == kind and f["node"] == node and f["term"] == self.term for f in self.failovers):
            return
        self.failovers.append({"kind": kind, "node": node, "term": self.term, "at": self.clock.wall()})
        del self.failovers[:-50]
        log.warning("coordinator.failover", kind=kind, node=node, term=self.term)

    def on_stage_ready(self, msg: StageReady) -> None:
        rec = self.current
        if not self.active or rec is None or Epoch.of(msg) != rec.epoch:
            return
        if not msg.ok:
            log.warning("coordinator.load_failed", node=msg.node, error=msg.error)
            self.load_failed[msg.node] = msg.error
            self.schedule()
            return
        rec.ready_nodes.add(msg.node)
        if not rec.ready and set(rec.nodes) <= rec.ready_nodes:
            rec.ready = True
            log.info("coordinator.plan_ready", epoch=str(rec.epoch), ready_s=round(self.clock.now() - rec.started, 3))
            for node in self.members:
                self.send(node, "stage", PlanReady(rec.update.term, rec.update.version))

    def refresh(self) -> None:
        """Re-send the current plan (and its readiness) to every member: a node that
        joined late or missed a message catches up; nodes ignore what they have."""
        rec = self.current
        if not self.active or rec is None:
            return
        for node in self.members:
            self.send(node, "stage", rec.update)
            if rec.ready:
                self.send(node, "stage", PlanReady(rec.update.term, rec.update.version))

    # -- planning ---------------------------------------------------------------------

    def schedule(self, delay: float | None = None) -> None:
        now = self.clock.now()
        due = self._debounce.request(now, self.debounce_s if delay is None else delay)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.clock.call_later(due - now, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.clock.now()
        if self._debounce.fire(now):
            self._maybe_replan()
        elif self._debounce.due is not None:  # not yet (a later request restarted the wait)
            self._timer = self.clock.call_later(self._debounce.due - now, self._on_timer)

    def _maybe_replan(self) -> None:
        if not self.active:
            return
        usable = [c for c in self.capacities.values() if c.node_id not in self.load_failed]
        try:
            stages, error = _entries(plan(usable, self.profile, max_stages=self.max_stages)), ""
        except InsufficientMemory as exc:
            stages, error = [], str(exc)
            if self.load_failed:  # the real cause: say which nodes could not load, and why
                failed = "; ".join(f"node {n[:8]}: {e}" for n, e in sorted(self.load_failed.items()))
                error = f"no pipeline: nodes failed to load their layers ({failed}); {error}"
        rec = self.current
        if (rec is not None and rec.update.term == self.term and rec.update.stages == stages
                and rec.update.error == error):
            return  # this term already announced exactly this plan
        self.version += 1
        update = PlanUpdate(self.term, self.version, self.node_id, self.model, stages, error, list(self.failovers))
        self.current = PlanRecord(update, self.clock.now())
        if error:
            log.error("coordinator.degraded", error=error, epoch=str(Epoch.of(update)))
        else:
            log.info("coordinator.plan", epoch=str(Epoch.of(update)),
                     stages=[(s.node, s.start, s.end) for s in stages])
        for node in self.members:
            self.send(node, "stage", update)


def _entries(p: Plan | None) -> list[StageEntry]:
    if p is None:
        return []
    return [StageEntry(s.index, s.node_id, s.start, s.end, s.backend) for s in p.stages]
