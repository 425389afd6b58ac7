"""The coordinator's load deadline (mesh/pipeline/coordinator.py, load_deadline.py), on a
hand-moved clock: a member that takes layers and never reports StageReady used to stall
the plan forever. Past its deadline the coordinator re-plans without it, keeps it out
for a back-off that doubles while it keeps missing, says why, and gives it another
chance afterwards. A slow honest node that answers within its deadline keeps its layers."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from actors.clock import ManualClock
from mesh.pipeline.coordinator import CoordinatorRole
from mesh.pipeline.load_deadline import LoadDeadline, stage_bytes
from mesh.pipeline.messages import PlanReady, PlanUpdate, StageEntry, StageReady
from mesh.planner import ModelProfile, NodeCapacity

PROFILE = ModelProfile(n_layers=8, layer_bytes=10 << 20, embed_bytes=4 << 20, head_bytes=4 << 20)
HONEST = NodeCapacity("honest", 1 << 30, 1.0)
STALLER = NodeCapacity("staller", 1 << 30, 1.0)  # as big and fast: the plan gives it half the layers


class World:
    def __init__(self) -> None:
        self.clock = ManualClock()
        self.sent: list[tuple[str, object]] = []
        self.role = CoordinatorRole("honest", "m", PROFILE, lambda node, actor, msg: self.sent.append((node, msg)),
                                    clock=self.clock)
        self.role.take_office(1, None)

    def plans(self) -> list[PlanUpdate]:
        seen: dict[int, PlanUpdate] = {}
        for _, msg in self.sent:
            if isinstance(msg, PlanUpdate):
                seen[msg.version] = msg
        return [seen[v] for v in sorted(seen)]

    def last_plan(self) -> PlanUpdate:
        return self.plans()[-1]

    def ready(self, node: str, plan: PlanUpdate | None = None) -> None:
        plan = plan or self.last_plan()
        self.role.on_stage_ready(StageReady(plan.term, plan.version, node, ok=True))

    def served(self, plan: PlanUpdate) -> bool:
        return any(isinstance(m, PlanReady) and m.version == plan.version for _, m in self.sent)

    def deadline_of(self, node: str, plan: PlanUpdate) -> float:
        stage = next(s for s in plan.stages if s.node == node)
        return LoadDeadline().for_stage(stage, len(plan.stages), PROFILE)

    def left(self, node: str, plan: PlanUpdate) -> float:
        """Seconds from now to ``node``'s deadline for the current plan ``plan``."""
        assert self.role.current.update == plan
        return self.role.current.started + self.deadline_of(node, plan) - self.clock.now()


def nodes(plan: PlanUpdate) -> set[str]:
    return {s.node for s in plan.stages}


def test_a_deadline_is_a_floor_plus_the_stages_bytes_at_a_slow_read_rate():
    d = LoadDeadline(floor_s=60.0, bytes_per_s=8 << 20)
    head, tail = StageEntry(0, "a", 0, 4, "torch"), StageEntry(1, "b", 4, 8, "torch")
    assert stage_bytes(head, 2, PROFILE) == 4 * PROFILE.layer_bytes + PROFILE.embed_bytes
    assert stage_bytes(tail, 2, PROFILE) == 4 * PROFILE.layer_bytes + PROFILE.head_bytes
    assert d.for_stage(head, 2, PROFILE) == pytest.approx(60.0 + (44 << 20) / (8 << 20))
    whole = StageEntry(0, "a", 0, 8, "torch")
    assert d.for_stage(whole, 1, PROFILE) > d.for_stage(head, 2, PROFILE) > d.floor_s  # more to read, more time
    assert [d.back_off(k) for k in (1, 2, 3, 9)] == [300.0, 600.0, 1200.0, 3600.0]  # doubling, capped
    with pytest.raises(ValueError):
        LoadDeadline(floor_s=0)


async def test_a_member_that_never_reports_ready_is_planned_around_after_its_deadline():
    w = World()
    w.role.set_members([HONEST, STALLER])
    w.clock.advance(1.0)
    first = w.last_plan()
    assert nodes(first) == {"honest", "staller"}
    w.ready("honest")  # the staller takes its layers and never answers
    deadline = w.deadline_of("staller", first)
    with capture_logs() as logs:
        w.clock.advance(w.left("staller", first) - 0.5)  # just before its deadline: still waiting for it
        assert w.last_plan() == first and not w.served(first)
        w.clock.advance(1.0)  # past it: re-planned on the honest node alone
    second = w.last_plan()
    assert nodes(second) == {"honest"} and second.version > first.version
    timeouts = [e for e in logs if e["event"] == "coordinator.load_timeout"]
    assert [e["node"] for e in timeouts] == ["staller"]
    assert timeouts[0]["deadline_s"] == pytest.approx(deadline, abs=0.01) and timeouts[0]["back_off_s"] == 300.0
    assert any(f["kind"] == "load_timeout" and f["node"] == "staller" for f in second.failovers)  # shown
    w.ready("honest")
    assert w.served(second)
    assert w.role.held_out_view()["staller"]["missed"] == 1


async def test_the_staller_stays_out_for_its_back_off_then_gets_another_chance_and_misses_double():
    w = World()
    w.role.set_members([HONEST, STALLER])
    w.clock.advance(1.0)
    first = w.last_plan()
    w.ready("honest")
    w.clock.advance(w.left("staller", first) + 0.1)
    second = w.last_plan()
    w.ready("honest")
    w.role.set_members([HONEST, STALLER])  # it still heartbeats and is still a member: no change
    w.clock.advance(299.0)
    assert w.last_plan() == second  # held out for the back-off
    w.clock.advance(2.0)  # back-off over: placed again
    third = w.last_plan()
    assert nodes(third) == {"honest", "staller"}
    w.ready("honest")
    with capture_logs() as logs:
        w.clock.advance(w.left("staller", third) + 0.1)  # and it misses again
    assert nodes(w.last_plan()) == {"honest"}
    assert [e["back_off_s"] for e in logs if e["event"] == "coordinator.load_timeout"] == [600.0]


async def test_a_slow_honest_node_that_answers_within_its_deadline_keeps_its_layers():
    w = World()
    w.role.set_members([HONEST, STALLER])
    w.clock.advance(1.0)
    first = w.last_plan()
    w.ready("honest")
    w.clock.advance(w.left("staller", first) - 0.5)  # slow, but in time
    w.ready("staller", first)
    assert w.served(first)
    w.clock.advance(10_000.0)
    assert w.last_plan() == first  # no re-plan, nobody held out
    assert w.role.held_out_view() == {}


async def test_a_node_that_left_while_held_out_is_still_held_out_when_it_returns():
    """Leaving and rejoining must not reset the back-off (a staller would cycle)."""
    w = World()
    w.role.set_members([HONEST, STALLER])
    w.clock.advance(1.0)
    w.ready("honest")
    w.clock.advance(w.left("staller", w.last_plan()) + 0.1)
    w.ready("honest")
    w.role.set_members([HONEST])
    w.clock.advance(1.0)
    w.role.set_members([HONEST, STALLER])
    w.clock.advance(1.0)
    assert nodes(w.last_plan()) == {"honest"}


def test_mesh_status_says_who_is_held_out_and_why(capsys):
    from mesh.commands.status import print_view

    reason = "did not report its layers of plan 1.1 loaded within its 66 s deadline; out of placement for 300 s"
    print_view({"nodes": [{"id": "staller0123456789", "name": "big-box"}], "coordinator": None, "term": 1,
                "held_out": {"staller0123456789": {"for_s": 299.5, "missed": 1, "reason": reason}}}, "http://x")
    out = " ".join(capsys.readouterr().out.split())
    assert "held out big-box" in out and "66 s deadline" in out, out
