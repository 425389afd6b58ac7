"""The coordinator's part of the pipeline: place the layers, tell every node, and say
when the plan is ready to serve.

It runs only on the node the election made coordinator, and every message it sends
carries its term (fencing). It re-plans when the set of live nodes changes — a stage's
node died (failover), a node joined (used by the new plan), a node failed to load —
after the membership has been quiet for a short debounce, so a burst of joins gives
one plan rather than several. A plan stops the mesh serving until every stage reports
StageReady, so each stage has a load deadline (`LoadDeadline`: a floor plus its bytes at
a slow read rate); a node past it is re-planned around and held out for a back-off.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import structlog

from actors.clock import LOOP_CLOCK, Clock
from mesh.pipeline.load_deadline import LoadDeadline
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


@dataclass
class HeldOut:
    """A node kept out of placement until ``until`` (it missed a load deadline)."""

    until: float
    missed: int  # deadlines missed in a row (the back-off doubles with each)
    reason: str


class CoordinatorRole:
    def __init__(self, node_id: str, model: str, profile: ModelProfile, send: Send, *,
                 debounce_s: float = 0.3, failover_debounce_s: float = 0.02, max_stages: int | None = None,
                 load_deadline: LoadDeadline = LoadDeadline(), clock: Clock = LOOP_CLOCK):
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
        self.load_deadline = load_deadline
        # missed a load deadline: out until the back-off ends, whether or not it leaves meanwhile
        self.held_out: dict[str, HeldOut] = {}
        self._debounce = Debounce()
        self._timer: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
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
        self._cancel_deadline()

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
        held = self.held_out.get(msg.node)
        if held is not None and held.until <= self.clock.now():
            del self.held_out[msg.node]  # it loaded in time on its second chance: the slate is clean
        if not rec.ready and set(rec.nodes) <= rec.ready_nodes:
            rec.ready = True
            self._cancel_deadline()
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
        now = self.clock.now()
        usable = [c for c in self.capacities.values()
                  if c.node_id not in self.load_failed and not self._is_held_out(c.node_id, now)]
        try:
            stages, error = _entries(plan(usable, self.profile, max_stages=self.max_stages)), ""
        except InsufficientMemory as exc:
            stages, error = [], str(exc)
            failed = dict(self.load_failed)
            failed.update({n: h.reason for n, h in self.held_out.items() if n in self.capacities and h.until > now})
            if failed:  # the real cause: say which nodes could not load, and why
                causes = "; ".join(f"node {n[:8]}: {e}" for n, e in sorted(failed.items()))
                error = f"no pipeline: nodes failed to load their layers ({causes}); {error}"
        rec = self.current
        if (rec is not None and rec.update.term == self.term and rec.update.stages == stages
                and rec.update.error == error):
            return  # this term already announced exactly this plan
        self.version += 1
        update = PlanUpdate(self.term, self.version, self.node_id, self.model, stages, error, list(self.failovers))
        self.current = PlanRecord(update, self.clock.now())
        self._arm_deadline()
        if error:
            log.error("coordinator.degraded", error=error, epoch=str(Epoch.of(update)))
        else:
            log.info("coordinator.plan", epoch=str(Epoch.of(update)),
                     stages=[(s.node, s.start, s.end) for s in stages])
        for node in self.members:
            self.send(node, "stage", update)

    # -- load deadlines ---------------------------------------------------------------

    def _deadlines(self, rec: PlanRecord) -> dict[str, float]:
        """When each stage's node must have reported its layers loaded."""
        n = len(rec.update.stages)
        return {s.node: rec.started + self.load_deadline.for_stage(s, n, self.profile) for s in rec.update.stages}

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        rec = self.current
        if not self.active or rec is None or rec.ready:
            return
        waiting = [t for node, t in self._deadlines(rec).items() if node not in rec.ready_nodes]
        if waiting:
            self._deadline_timer = self.clock.call_later(min(waiting) - self.clock.now(), self._on_deadline)

    def _cancel_deadline(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        rec = self.current
        if not self.active or rec is None or rec.ready:
            return
        now = self.clock.now()
        late = False
        for node, due in sorted(self._deadlines(rec).items()):
            if node in rec.ready_nodes or now < due - 1e-9:
                continue
            late = True
            self._hold_out(node, now, waited=now - rec.started, deadline=due - rec.started, epoch=rec.epoch)
        if late:
            self.schedule(self.failover_debounce_s)
        else:
            self._arm_deadline()  # a timer a rounding error early: wait for the rest

    def _hold_out(self, node: str, now: float, *, waited: float, deadline: float, epoch: Epoch) -> None:
        before = self.held_out.get(node)
        missed = (before.missed if before is not None else 0) + 1
        back_off = self.load_deadline.back_off(missed)
        reason = (f"did not report its layers of plan {epoch} loaded within its {deadline:.0f} s deadline; "
                  f"out of placement for {back_off:.0f} s")
        self.held_out[node] = HeldOut(now + back_off, missed, reason)
        log.warning("coordinator.load_timeout", node=node, epoch=str(epoch), waited_s=round(waited, 3),
                    deadline_s=round(deadline, 3), missed=missed, back_off_s=back_off)
        self._record("load_timeout", node)
        self.clock.call_later(back_off, self._on_back_off_over, node)

    def _on_back_off_over(self, node: str) -> None:
        if self.active and node in self.capacities and not self._is_held_out(node, self.clock.now()):
            self.schedule(self.debounce_s)  # another chance

    def _is_held_out(self, node: str, now: float) -> bool:
        held = self.held_out.get(node)
        return held is not None and now < held.until - 1e-9

    def held_out_view(self) -> dict[str, dict]:
        """The nodes out of placement for a missed load deadline: how long still, and why."""
        now = self.clock.now()
        return {n: {"for_s": round(h.until - now, 1), "missed": h.missed, "reason": h.reason}
                for n, h in sorted(self.held_out.items()) if h.until > now}


def _entries(p: Plan | None) -> list[StageEntry]:
    if p is None:
        return []
    return [StageEntry(s.index, s.node_id, s.start, s.end, s.backend) for s in p.stages]
