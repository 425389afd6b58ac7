"""Verification on real in-process nodes: honest stages pass their audits; a stage that
tampers with its outputs, skips a layer or corrupts the wire is flagged with evidence
and evicted, and the answer completes; a rogue node that will not let its steps be
fetched is flagged too. The audit schedule is seeded, so every run audits the same steps."""

from __future__ import annotations

import pytest
from reference import PROMPTS, Request

from mesh.testing.inproc import InProcessMesh
from mesh.verify.messages import AuditData, AuditFetch
from mesh.verify.recorder import VERIFY_ACTOR
from mesh.verify.service import VerifyConfig

pytestmark = [pytest.mark.timeout(600)]

TOKENS = 40


def _verification(mesh: InProcessMesh) -> dict:
    return mesh.coordinator().verification()


async def _answer_then_audits(mesh: InProcessMesh, prompt: str, *, node: int, flagged: bool) -> list[int]:
    """Stream one answer, then wait (virtual time) until the audits it asked for are done,
    or until a node is flagged."""
    tokens = await mesh.tokens(prompt, node=node, max_tokens=TOKENS)

    def settled() -> bool:
        v = _verification(mesh)
        if flagged:
            return bool(v["flagged_nodes"]) and all(n.plan.ready for n in mesh.alive)
        return v["audits"] > 0 and v["audits_pending"] == 0

    await mesh.wait_for(settled, timeout=120, what="the answer's audits")
    return tokens


async def _cheating_mesh(spec: str, seed: int) -> InProcessMesh:
    mesh = InProcessMesh(seed=seed, verify=VerifyConfig(audit_seed=str(seed), fault=f"stage=1:{spec}"))
    await mesh.start(3)
    await mesh.wait_ready(stages=3)
    return mesh


def _cheater(mesh: InProcessMesh) -> str:
    return mesh.nodes[0].plan.update.stages[1].node


def test_honest_stages_pass_every_audit(vrun, reference, model_path):
    async def scenario():
        mesh = InProcessMesh(seed=61)
        try:
            await mesh.start(3)
            await mesh.wait_ready(stages=3)
            got = [await _answer_then_audits(mesh, p, node=i % 3, flagged=False) for i, p in enumerate(PROMPTS[:3])]
            return got, _verification(mesh)
        finally:
            await mesh.stop()

    got, v = vrun(scenario())
    assert got == [reference.tokens(Request(p, 0.0, max_tokens=TOKENS)) for p in PROMPTS[:3]]
    assert v["commitments"] > 0 and v["verified_links"] > 0 and v["broken_links"] == 0
    assert v["audits"] >= 10 and v["audit_failures"] == 0 and not v["flagged_nodes"], v


@pytest.mark.parametrize("spec", ["tamper:scale=0.01", "skip-layer:3"])
def test_a_cheating_stage_is_flagged_evicted_and_the_answers_complete(vrun, reference, model_path, spec):
    prompt = PROMPTS[3]

    async def scenario():
        mesh = await _cheating_mesh(spec, seed=71)
        try:
            cheater = _cheater(mesh)
            serving = next(i for i, n in enumerate(mesh.nodes) if n.node_id != cheater)
            first = await _answer_then_audits(mesh, prompt, node=serving, flagged=True)
            await mesh.wait_ready(stages=2)
            after = await mesh.tokens(prompt, node=serving, max_tokens=TOKENS)
            return cheater, first, after, _verification(mesh), mesh.nodes[serving].plan
        finally:
            await mesh.stop()

    cheater, first, after, v, plan = vrun(scenario())
    assert first, "the answer did not complete"
    (flag,) = v["flagged_nodes"]
    assert flag["node"] == cheater and flag["reason"].startswith("two audits failed"), flag
    assert len(flag["evidence"]["audits"]) == 2 and flag["evidence"]["batch"]["stage"] == 1
    assert v["audit_failures"] >= 2
    assert cheater not in [s.node for s in plan.update.stages]  # evicted: re-planned without it
    assert any(f["kind"] == "evicted" and f["node"] == cheater for f in plan.failovers)
    assert after == reference.tokens(Request(prompt, 0.0, max_tokens=TOKENS))  # honest again


def test_a_stage_that_corrupts_the_wire_is_caught_by_the_next_stage_and_flagged(vrun, reference, model_path):
    prompt = PROMPTS[5]

    async def scenario():
        mesh = await _cheating_mesh("corrupt-wire", seed=81)
        try:
            cheater = _cheater(mesh)
            serving = next(i for i, n in enumerate(mesh.nodes) if n.node_id != cheater)
            got = await _answer_then_audits(mesh, prompt, node=serving, flagged=True)
            return cheater, got, _verification(mesh), mesh.nodes[serving].plan
        finally:
            await mesh.stop()

    cheater, got, v, plan = vrun(scenario())
    assert got == reference.tokens(Request(prompt, 0.0, max_tokens=TOKENS))  # each bad hop was re-sent clean
    (flag,) = v["flagged_nodes"]
    assert flag["node"] == cheater
    reports = flag["evidence"]["reports"]
    assert len(reports) == 2 and all(r["claimed"] != r["actual"] for r in reports)
    assert cheater not in [s.node for s in plan.update.stages]


def test_a_rogue_node_that_will_not_be_audited_is_flagged(vrun, model_path):
    """A node that holds a stage but answers every audit fetch with "not retained"
    (so its outputs are never re-checked) fails its audits and is evicted."""
    def refuse(node, msg: AuditFetch) -> AuditData:
        return AuditData(False, "step is not retained")

    async def scenario():
        mesh = InProcessMesh(seed=91)
        try:
            await mesh.add()
            await mesh.add()
            rogue = await mesh.add(handlers={VERIFY_ACTOR: {AuditFetch: refuse}})
            await mesh.wait_ready(stages=3)
            serving = 0
            await _answer_then_audits(mesh, PROMPTS[6], node=serving, flagged=True)
            await mesh.wait_ready(stages=2)  # the flag's re-plan (the old plan is still ready when it lands)
            return rogue.node_id, _verification(mesh), mesh.nodes[serving].plan
        finally:
            await mesh.stop()

    rogue, v, plan = vrun(scenario())
    (flag,) = v["flagged_nodes"]
    assert flag["node"] == rogue and "could not supply" in flag["reason"], flag
    assert rogue not in [s.node for s in plan.update.stages]
