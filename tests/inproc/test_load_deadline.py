"""A member that takes layers and never reports StageReady (issue 17): on real
in-process nodes, on virtual time.

The rogue is admitted (auto mode: any key with the secret), claims a big, fast machine,
so the planner gives it most of the layers, and ignores every PlanUpdate. A new plan
stops the mesh serving until each stage reports its layers loaded, so before the load
deadline the mesh served no one, forever. Now the coordinator waits the stage's
deadline, re-plans on the honest nodes, keeps the rogue out for a back-off, logs and
shows why, and the mesh serves the single-device tokens."""

from __future__ import annotations

import pytest
from reference import PROMPTS, Request
from structlog.testing import capture_logs

from actors.clock import LOOP_CLOCK
from mesh.pipeline.load_deadline import LoadDeadline
from mesh.pipeline.messages import PlanUpdate
from mesh.pipeline.stage_host import STAGE_ACTOR
from mesh.testing.inproc import InProcessMesh

pytestmark = [pytest.mark.timeout(300)]

REQ = Request(PROMPTS[1], 0.0, max_tokens=8)
# Stated small so the test takes seconds: the rule, not the default numbers (tests/mesh/test_load_deadline.py).
DEADLINE = LoadDeadline(floor_s=4.0, bytes_per_s=float(1 << 30), back_off_s=600.0)


def test_a_member_that_never_reports_its_stage_loaded_is_planned_around(vrun, reference):
    plans_with_the_rogue: list[PlanUpdate] = []

    def never_load(node, msg: PlanUpdate) -> None:  # takes the layers, says nothing
        if any(s.node == node.node_id for s in msg.stages) and msg not in plans_with_the_rogue:
            plans_with_the_rogue.append(msg)

    async def scenario():
        mesh = InProcessMesh(seed=173, load_deadline=DEADLINE)
        try:
            await mesh.add()
            await mesh.add()
            await mesh.wait_ready(stages=2)
            honest = mesh.nodes[:2]
            with capture_logs() as logs:
                rogue = await mesh.add(handlers={STAGE_ACTOR: {PlanUpdate: never_load}}, campaign=False,
                                       memory_limit=4 << 30, speed=100.0)
                await mesh.wait_for(lambda: bool(plans_with_the_rogue), timeout=30, what="a plan that uses the rogue")
                stalled_at = LOOP_CLOCK.now()
                assert not any(n.plan.ready for n in honest)  # the stall: nobody serves meanwhile
                await mesh.wait_for(lambda: all(n.plan.ready and rogue.node_id not in {s.node for s in n.plan.update.stages}
                                                for n in honest), timeout=60, what="a ready plan without the rogue")
                recovered_after = LOOP_CLOCK.now() - stalled_at
                got = [await mesh.tokens(REQ.prompt, node=i, max_tokens=REQ.max_tokens) for i in range(2)]
            coordinator = mesh.coordinator()
            return (rogue.node_id, recovered_after, got, logs, coordinator.status(),
                    {s.node for s in honest[0].plan.update.stages}, [n.node_id for n in honest])
        finally:
            await mesh.stop()

    rogue, recovered_after, got, logs, status, stage_nodes, honest = vrun(scenario())
    assert got == [reference.tokens(REQ)] * 2
    assert stage_nodes == set(honest)
    stage = next(s for s in plans_with_the_rogue[0].stages if s.node == rogue)
    assert stage.end > stage.start  # it was given layers (nodes on one host get equal shares: 10 of 30)
    assert DEADLINE.floor_s <= recovered_after < DEADLINE.floor_s + 3.0, recovered_after  # its deadline, not forever
    timeouts = [e for e in logs if e.get("event") == "coordinator.load_timeout"]
    assert [e["node"] for e in timeouts] == [rogue] and timeouts[0]["back_off_s"] == 600.0
    assert rogue in status["held_out"] and "deadline" in status["held_out"][rogue]["reason"]
    assert any(f["kind"] == "load_timeout" and f["node"] == rogue for f in status["failovers"])
