"""Adaptive cheaters on real in-process nodes (issue 18: H1, H2, H3): each is a fault
mode of mesh/testing/faults.py, a stage that cheats against the protocol, not a hook
that confesses. Each is flagged and evicted and the answer completes; an honest mesh
under load, with a node whose commitments reach the coordinator seconds late, flags
nobody. The audit schedule is seeded, so every run audits the same steps."""

from __future__ import annotations

import asyncio

import pytest
from reference import PROMPTS, Request

from actors.clock import LOOP_CLOCK
from mesh.testing.inproc import InProcessMesh
from mesh.verify.ledger import COMMIT_DEADLINE_S
from mesh.verify.service import VerifyConfig

pytestmark = [pytest.mark.timeout(600)]

TOKENS = 24


def _verification(mesh: InProcessMesh) -> dict:
    return mesh.coordinator().verification()


async def _flagged_after_one_answer(spec: str, seed: int, prompt: str):
    """Stage 1's first holder cheats with ``spec``: one answer from another node, then
    wait (virtual time) for a flag and the re-plan without the flagged node."""
    mesh = InProcessMesh(seed=seed, verify=VerifyConfig(audit_seed=str(seed), fault=f"stage=1:{spec}"))
    try:
        await mesh.start(3)
        await mesh.wait_ready(stages=3)
        cheater = mesh.nodes[0].plan.update.stages[1].node
        serving = next(i for i, n in enumerate(mesh.nodes) if n.node_id != cheater)
        started = LOOP_CLOCK.now()
        got = await mesh.tokens(prompt, node=serving, max_tokens=TOKENS)
        await mesh.wait_for(lambda: bool(_verification(mesh)["flagged_nodes"]), timeout=120,
                            what=f"a flag of the {spec} cheater")
        flagged_after = LOOP_CLOCK.now() - started
        await mesh.wait_ready(stages=2)
        after = await mesh.tokens(prompt, node=serving, max_tokens=TOKENS)
        return cheater, got, after, _verification(mesh), mesh.nodes[serving].plan, flagged_after
    finally:
        await mesh.stop()


def _check_evicted(cheater, v, plan, reason: str) -> dict:
    (flag,) = v["flagged_nodes"]  # the cheater, and nobody else
    assert flag["node"] == cheater and reason in flag["reason"], flag
    assert cheater not in [s.node for s in plan.update.stages]
    assert any(f["kind"] == "evicted" and f["node"] == cheater for f in plan.failovers)
    return flag


def test_h1_a_stage_that_sends_garbage_but_signs_the_honest_digest_is_flagged(vrun, reference, model_path):
    prompt = PROMPTS[3]
    cheater, got, after, v, plan, took = vrun(_flagged_after_one_answer("lie-digest", 171, prompt))
    flag = _check_evicted(cheater, v, plan, "broken-link")
    strike = flag["evidence"]["strikes"][0]
    assert strike["committed_by"]["node"] == cheater and strike["batch"]["node"] != cheater
    assert got, "the answer did not complete"
    assert after == reference.tokens(Request(prompt, 0.0, max_tokens=TOKENS))  # honest again


def test_h2_a_stage_that_answers_audit_fetches_wrongly_or_not_at_all_is_flagged(vrun, reference, model_path):
    prompt = PROMPTS[4]
    cheater, got, after, v, plan, took = vrun(_flagged_after_one_answer("refuse-fetch", 172, prompt))
    flag = _check_evicted(cheater, v, plan, "two audits failed")
    assert all(not a["ok"] and not a.get("inconclusive") for a in flag["evidence"]["audits"])
    assert got == after == reference.tokens(Request(prompt, 0.0, max_tokens=TOKENS))  # it computed honestly


def test_h3_a_stage_that_withholds_its_commitments_is_flagged(vrun, reference, model_path):
    prompt = PROMPTS[5]
    cheater, got, after, v, plan, took = vrun(_flagged_after_one_answer("withhold", 173, prompt))
    _check_evicted(cheater, v, plan, "missing-commitment")
    assert got == after == reference.tokens(Request(prompt, 0.0, max_tokens=TOKENS))


def test_h3_honest_nodes_under_load_with_late_commitments_are_not_flagged(vrun, reference, model_path):
    """Six answers at once, and one node's batches reach the coordinator 6 s late (a node
    whose loop or link is slow): within the deadline, so nobody is charged anything."""
    prompts = PROMPTS[:6]
    delay = COMMIT_DEADLINE_S - 4.0

    async def scenario():
        mesh = InProcessMesh(seed=174)
        try:
            await mesh.start(3)
            await mesh.wait_ready(stages=3)
            slow = mesh.nodes[0].plan.update.stages[1].node
            node = next(n for n in mesh.nodes if n.node_id == slow)
            recorder = node.verify.recorder
            send = recorder.send
            recorder.send = lambda to, actor, msg: LOOP_CLOCK.call_later(delay, send, to, actor, msg)
            got = await asyncio.gather(*(mesh.tokens(p, node=i % 3, max_tokens=TOKENS)
                                         for i, p in enumerate(prompts)))
            ledger = mesh.coordinator().verify.ledger

            def settled() -> bool:  # every owed record paid (or judged), every audit answered
                v = _verification(mesh)
                return not any(ledger.owed.values()) and v["audits"] > 0 and v["audits_pending"] == 0

            await mesh.wait_for(settled, timeout=120, what="the owed records and the audits")
            return got, _verification(mesh)
        finally:
            await mesh.stop()

    got, v = vrun(scenario())
    assert got == [reference.tokens(Request(p, 0.0, max_tokens=TOKENS)) for p in prompts]
    assert not v["flagged_nodes"] and v["strikes"] == 0 and v["missing_commitments"] == 0, v
    assert v["audits"] >= 10 and v["audit_failures"] == 0 and v["verified_links"] > 0, v
