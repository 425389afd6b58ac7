"""Forged messages from a rogue member, on real in-process nodes (issue 17, part 1).

The rogue holds the cluster secret and was admitted (a member), but holds no stage and
never coordinates. It sends, over its authenticated link, the messages only another
node may send: a plan of its own (the highest plausible version, then PlanReady), a NodeFlagged, a
Heartbeat about another node, an AuditFetch of stage inputs it does not audit. Each is
refused, logged with the rogue's id, and the mesh keeps serving the single-device
tokens. Then each attack runs again with the binding switched off (`mesh.binding.refusal`
patched to accept everything, or the cluster's own check): the damage happens, so the
refusal is what stops it. The damaging half runs last, on the same mesh, mildest first.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from reference import PROMPTS, Request
from structlog.testing import capture_logs

from mesh import binding
from mesh.cluster.bounds import MAX_PLAN_VERSION_STEP
from mesh.cluster.service import ACTOR_NAME, ClusterService
from mesh.cluster.wire import Heartbeat
from mesh.pipeline.messages import Forward, PlanReady, PlanUpdate, StageEntry
from mesh.pipeline.stage_host import STAGE_ACTOR
from mesh.testing.inproc import InProcessMesh
from mesh.verify.messages import AuditData, AuditFetch, NodeFlagged
from mesh.verify.recorder import VERIFY_ACTOR

pytestmark = [pytest.mark.timeout(300)]

TOKENS = 8
REQ = Request(PROMPTS[3], 0.0, max_tokens=TOKENS)


class Rogue:
    """What reaches the rogue's stage actor: the Forwards a hijacked plan routes to it."""

    def __init__(self) -> None:
        self.forwards: list[Forward] = []

    def on_forward(self, node, msg: Forward) -> None:
        self.forwards.append(msg)


@pytest.fixture(scope="module")
def world(vrun):
    rogue_inbox = Rogue()

    async def build():
        m = InProcessMesh(seed=171)
        for _ in range(3):
            await m.add()
        # a member with no room for layers that never campaigns: no stage, never coordinator
        rogue = await m.add(handlers={STAGE_ACTOR: {Forward: rogue_inbox.on_forward}}, memory_limit=0,
                            campaign=False)
        honest = m.nodes[:3]
        await m.wait_for(lambda: all(rogue.node_id in {c.node_id for c in n._capacities()} for n in honest),
                         what="the rogue a member on every node")
        await m.wait_ready(stages=3)
        return m, rogue

    m, rogue = vrun(build())
    yield m, m.nodes[:3], rogue, rogue_inbox
    vrun(m.stop())


def tell(rogue, node: str, actor: str, msg) -> None:
    rogue.system.ref(node, actor).tell(msg)


def forged_plan(mesh: InProcessMesh, rogue) -> tuple[PlanUpdate, PlanReady]:
    """A plan that routes the whole model through the rogue, in the current term, with the
    highest version a node finds plausible (the real plans do not catch up for a long
    while); it names the real coordinator, too."""
    coord = mesh.coordinator()
    layers = coord.plan.update.stages[-1].end
    version = coord.plan.update.version + MAX_PLAN_VERSION_STEP
    return (PlanUpdate(coord.cluster.term, version, coord.node_id, coord.plan.update.model,
                       [StageEntry(0, rogue.node_id, 0, layers, "torch")]),
            PlanReady(coord.cluster.term, version))


def refused(node, kind: str) -> int:
    return node.forged.get(kind, 0)


def forged_lines(logs: list[dict], peer: str, kind: str) -> list[dict]:
    return [e for e in logs if e.get("event") == "link.forged" and e.get("peer") == peer and e.get("type") == kind]


def serves_single_device_tokens(mesh, vrun, reference) -> None:
    assert vrun(mesh.tokens(REQ.prompt, node=0, max_tokens=TOKENS)) == reference.tokens(REQ)


def stage0_and_session(honest):
    """The head (its inputs are the prompt), and the last session it committed steps of."""
    head = next(n for n in honest if n.plan.update.stages[0].node == n.node_id)
    (session, epoch), _ = next(iter(reversed(head.verify.recorder.sessions.items())))
    return head, session, epoch


# -- refused -------------------------------------------------------------------------------


def test_forged_plan_from_a_non_coordinator_is_refused_and_the_mesh_serves_on(world, vrun, reference):
    mesh, honest, rogue, inbox = world
    epochs = [n.plan.epoch for n in honest]

    async def attack():
        update, ready = forged_plan(mesh, rogue)
        before = [(refused(n, "PlanUpdate"), refused(n, "PlanReady")) for n in honest]
        for n in honest:
            tell(rogue, n.node_id, STAGE_ACTOR, update)
            tell(rogue, n.node_id, STAGE_ACTOR, ready)
        await mesh.wait_for(lambda: all(refused(n, "PlanUpdate") > b[0] and refused(n, "PlanReady") > b[1]
                                        for n, b in zip(honest, before)),
                            what="every node refusing the forged plan")

    with capture_logs() as logs:
        vrun(attack())
    assert [n.plan.epoch for n in honest] == epochs and all(n.plan.ready for n in honest)
    assert len(forged_lines(logs, rogue.node_id, "PlanUpdate")) == 3  # logged with the rogue's id
    assert len(forged_lines(logs, rogue.node_id, "PlanReady")) == 3
    serves_single_device_tokens(mesh, vrun, reference)
    assert inbox.forwards == []


def test_forged_node_flagged_evicts_nobody(world, vrun, reference):
    mesh, honest, rogue, _ = world
    coord = mesh.coordinator()
    victim = next(n for n in honest if n is not coord)

    async def attack():  # on the loop, as everything that reads membership or sends
        before = [refused(n, "NodeFlagged") for n in honest]
        for n in honest:
            tell(rogue, n.node_id, VERIFY_ACTOR, NodeFlagged(coord.cluster.term, victim.node_id, "audit failed", "{}"))
        await mesh.wait_for(lambda: all(refused(n, "NodeFlagged") > b for n, b in zip(honest, before)),
                            what="every node refusing the forged flag")

    vrun(attack())
    assert all(not n.verify.flags for n in honest)
    assert victim.node_id in {s.node for s in coord.plan.update.stages}
    serves_single_device_tokens(mesh, vrun, reference)


def victim_heartbeat(coord, victim) -> Heartbeat:
    """The victim's own heartbeat as the coordinator last saw it, with the rogue's address:
    its facts unchanged, so only the address would move (no re-plan)."""
    m = next(x for x in coord.cluster.members() if x.node_id == victim.node_id)
    return Heartbeat(victim.node_id, m.name, "10.6.6.6", 6666, m.backend, "", m.free_memory, api_port=6667)


def test_forged_heartbeat_about_another_node_does_not_move_it(world, vrun, reference):
    mesh, honest, rogue, _ = world
    coord = mesh.coordinator()
    victim = next(n for n in honest if n is not coord)

    def address():
        return next(x for x in coord.cluster.members() if x.node_id == victim.node_id).address

    async def attack():
        before, count = address(), coord.cluster.forged.get("Heartbeat", 0)
        for _ in range(3):
            tell(rogue, coord.node_id, ACTOR_NAME, victim_heartbeat(coord, victim))
        await mesh.wait_for(lambda: coord.cluster.forged.get("Heartbeat", 0) >= count + 3,
                            what="the forged heartbeats refused")
        return before, address()

    before, after = vrun(attack())
    assert after == before != ("10.6.6.6", 6666)
    serves_single_device_tokens(mesh, vrun, reference)


def test_audit_fetch_of_the_prompt_from_a_non_auditor_is_refused(world, vrun):
    mesh, honest, rogue, _ = world
    head, session, epoch = stage0_and_session(honest)

    async def attack():  # on the loop: membership reads the loop's (virtual) clock
        auditors = head.verify.fetchers(AuditFetch(epoch.term, epoch.version, session, 0, 0))
        assert auditors and rogue.node_id not in auditors, "seed: the rogue must not audit the head"
        count = refused(head, "AuditFetch")
        reply = await rogue.system.ref(head.node_id, VERIFY_ACTOR).ask(
            AuditFetch(epoch.term, epoch.version, session, 0, 0), timeout=5.0)
        return reply, refused(head, "AuditFetch") - count

    reply, refusals = vrun(attack())
    assert reply is None and refusals == 1


# -- the same attacks with the binding switched off: the damage happens ------------------------


@pytest.fixture
def binding_off(monkeypatch):
    monkeypatch.setattr(binding, "refusal", lambda msg, peer, view: None)


def test_without_the_binding_a_non_auditor_reads_the_prompt(world, vrun, binding_off):
    mesh, honest, rogue, _ = world
    head, session, epoch = stage0_and_session(honest)
    reply = vrun(rogue.system.ref(head.node_id, VERIFY_ACTOR).ask(
        AuditFetch(epoch.term, epoch.version, session, 0, 0), timeout=5.0))
    assert isinstance(reply, AuditData) and reply.ok
    prompt = head.encode_chat([{"role": "user", "content": REQ.prompt}])
    assert np.asarray(reply.inputs).tolist() == prompt


def test_without_the_binding_a_heartbeat_moves_another_node(world, vrun, monkeypatch):
    mesh, honest, rogue, _ = world
    monkeypatch.setattr(ClusterService, "_bound", lambda self, msg, claimed, peer: True)

    async def attack():
        coord = mesh.coordinator()
        victim = next(n for n in honest if n is not coord)
        tell(rogue, coord.node_id, ACTOR_NAME, victim_heartbeat(coord, victim))
        await mesh.wait_for(lambda: next(x for x in coord.cluster.members()
                                         if x.node_id == victim.node_id).address == ("10.6.6.6", 6666),
                            what="the victim's address rewritten")

    vrun(attack())


def test_without_the_binding_one_node_flagged_evicts(world, vrun, binding_off):
    mesh, honest, rogue, _ = world

    async def attack():
        coord = mesh.coordinator()
        victim = next(n for n in honest if n is not coord)
        tell(rogue, coord.node_id, VERIFY_ACTOR, NodeFlagged(coord.cluster.term, victim.node_id, "forged", "{}"))
        await mesh.wait_for(lambda: victim.node_id not in {s.node for s in coord.plan.update.stages},
                            what="the victim evicted")

    vrun(attack())


def test_without_the_binding_a_forged_plan_routes_the_prompt_to_the_rogue(world, vrun, binding_off):
    mesh, honest, rogue, inbox = world
    victim = honest[0]

    async def attack():
        update, ready = forged_plan(mesh, rogue)
        tell(rogue, victim.node_id, STAGE_ACTOR, update)
        tell(rogue, victim.node_id, STAGE_ACTOR, ready)
        await mesh.wait_for(lambda: victim.plan.ready and victim.plan.epoch.version == update.version,
                            what="the victim following the forged plan")
        answer = asyncio.ensure_future(mesh.tokens(REQ.prompt, node=0, max_tokens=TOKENS))
        try:
            await mesh.wait_for(lambda: bool(inbox.forwards), what="the prompt at the rogue")
        finally:
            answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)

    vrun(attack())
    prompt = victim.encode_chat([{"role": "user", "content": REQ.prompt}])
    assert inbox.forwards[0].tokens.tolist() == prompt
