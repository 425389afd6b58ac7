"""Forged messages from a rogue member, on real in-process nodes (issue 17, part 1): the
message types tests/inproc/test_forged_messages.py does not cover.

The rogue holds the cluster secret and was admitted, as a learner (the three honest
nodes hold the voters' seats); it has no room for layers, so it holds no stage and never
coordinates. While an honest session streams, it sends over its authenticated link what
only another node may send: an EndSession, a StepLost, a SessionFailed, a Retransmit, a
TokenOut of that session; a StageReady, a CommitBatch, an AuditReport, a WireFault in
another node's name; a Summary; Raft traffic with a higher term (it is no voter) and Raft
traffic in a voter's name. Each is refused, the refusal is logged with the rogue's id,
and the session gives the single-device tokens.

Then the same attacks run with the check switched off (`mesh.binding.refusal` patched
to accept, or the handler's own check): the damage happens, so the check is what stops
it. The damaging half runs last, on the same mesh, mildest first; the flags are spied on
(the ledger decides to flag, the eviction is not carried out) so the mesh keeps its
three stages until the last test, which evicts a node for real.

Two holes these tests found (both fail on the old code): an answer of a higher term from
a learner deposed the coordinator (any key admitted under `--admit auto` could force an
election whenever it liked); and a member at the head stage could blame any serving node
with WireFaults about a session nobody knows (a made-up id): two of them flagged it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import blake3
import pytest
from nacl.signing import SigningKey
from reference import PROMPTS, Request
from structlog.testing import capture_logs

from actors import NodeIdentity
from mesh import binding
from mesh.cluster.election import Election
from mesh.cluster.service import ACTOR_NAME as CLUSTER_ACTOR
from mesh.cluster.service import ClusterService
from mesh.cluster.wire import Heartbeat, RaftWire
from mesh.pipeline.messages import (
    EndSession,
    Retransmit,
    SessionFailed,
    StageReady,
    StepLost,
    TokenOut,
)
from mesh.pipeline.serving import Serving, SessionError
from mesh.pipeline.stage_host import COORD_ACTOR, SERVE_ACTOR, STAGE_ACTOR, StageHost
from mesh.testing.inproc import InProcessMesh
from mesh.verify.messages import AuditReport, AuditRequest, AuditResult, Summary, WireFault
from mesh.verify.recorder import VERIFY_ACTOR

pytestmark = [pytest.mark.timeout(300)]

TOKENS = 8
REQ = Request(PROMPTS[2], 0.0, max_tokens=TOKENS)
BOGUS_TOKEN = 1


def seeded_node_id(seed: int, index: int) -> str:
    """The id of node ``index`` of an InProcessMesh of ``seed`` (its key is derived so)."""
    return NodeIdentity(SigningKey(blake3.blake3(f"mesh in-process node {seed}.{index}".encode()).digest()[:32])).node_id


@pytest.fixture(scope="module")
def world(vrun):
    async def build():
        m = InProcessMesh(seed=172)
        # The lowest id holds stage 0 and would found the cluster: it never campaigns, so
        # the head is not the coordinator (a coordinator's own reports are its judgement).
        ids = [seeded_node_id(m.seed, i) for i in range(3)]
        for i in range(3):
            await m.add(campaign=ids[i] != min(ids))
        await m.wait_ready(stages=3)  # the three seats taken: the rogue joins as a learner
        # a member with no room for layers that never campaigns: no stage, never coordinator, a learner
        rogue = await m.add(memory_limit=0, campaign=False)
        honest = m.nodes[:3]
        await m.wait_for(lambda: all(rogue.node_id in n.cluster.election.members for n in honest),
                         what="the rogue a member on every node")
        await m.wait_ready(stages=3)
        assert all(rogue.node_id not in n.cluster.election.voters for n in honest), "the rogue must be a learner"
        return m, rogue

    m, rogue = vrun(build())
    yield m, m.nodes[:3], rogue
    vrun(m.stop())


class Scene:
    """What an attack sees: the mesh, the honest nodes, the rogue, and the live session."""

    def __init__(self, mesh: InProcessMesh, honest: list, rogue, serving, session) -> None:
        self.mesh, self.honest, self.rogue, self.serving, self.session = mesh, honest, rogue, serving, session
        self.plan = serving.plan.update
        self.coord = mesh.coordinator()
        self.stage_nodes = [next(n for n in honest if n.node_id == s.node) for s in self.plan.stages]
        self.head = self.stage_nodes[0]

    @property
    def term(self) -> int:
        return self.plan.term

    @property
    def version(self) -> int:
        return self.plan.version

    def tell(self, node, actor: str, msg: Any) -> None:
        self.rogue.system.ref(node.node_id, actor).tell(msg)

    def victim(self):
        """An honest node that is not the coordinator and holds a stage."""
        return next(n for n in self.stage_nodes if n is not self.coord)


Attack = Callable[[Scene], Awaitable[Any]]


async def answer_under(mesh: InProcessMesh, honest: list, rogue, attack: Attack) -> tuple[list[int], Any]:
    """Stream one answer from ``honest[0]``; once its first token is out (its prefill
    passed every stage), run ``attack(scene)`` while the rest streams. Returns the
    answer's tokens and what the attack returned."""
    node = honest[0]
    tokens: list[int] = []
    result: Any = None
    scene: Scene | None = None
    async for event in node.generate(REQ.prompt, max_tokens=TOKENS):
        if scene is None:
            (session,) = node.serving.sessions.values()
            scene = Scene(mesh, honest, rogue, node, session)
            result = await attack(scene)
        if not event.stop_token:
            tokens.append(event.token_id)
    return tokens, result


def forged_lines(logs: list[dict], peer: str, kind: str) -> list[dict]:
    return [e for e in logs if e.get("event") == "link.forged" and e.get("peer") == peer and e.get("type") == kind]


async def refused_by(scene: Scene, expect: list[tuple[Any, str]], send: Callable[[], None]) -> None:
    """Send (``send()``), then wait until every (node, kind) in ``expect`` counted one more
    refusal of that kind."""
    before = [(node, kind, node.forged.get(kind, 0)) for node, kind in expect]
    send()
    await scene.mesh.wait_for(lambda: all(node.forged.get(kind, 0) > n for node, kind, n in before),
                              what=f"the forged {sorted({k for _, k in expect})} refused")


# -- the attacks (each sends its forgeries and waits until they are refused) ---------------------


async def end_session(s: Scene):
    def send():
        for node in s.stage_nodes:
            s.tell(node, STAGE_ACTOR, EndSession(s.session.id))
    await refused_by(s, [(n, "EndSession") for n in s.stage_nodes], send)
    return [(n, "EndSession") for n in s.stage_nodes]


async def step_lost(s: Scene):
    await refused_by(s, [(s.serving, "StepLost")],
                     lambda: s.tell(s.serving, SERVE_ACTOR, StepLost(s.term, s.version, s.session.id, 1)))
    return [(s.serving, "StepLost")]


async def session_failed(s: Scene):
    await refused_by(s, [(s.serving, "SessionFailed")], lambda: s.tell(
        s.serving, SERVE_ACTOR, SessionFailed(s.term, s.version, s.session.id, "forged: the stage failed")))
    return [(s.serving, "SessionFailed")]


async def retransmit(s: Scene):
    def send():
        for node in s.stage_nodes:  # every stage its last step, and the serving side its prefill
            step = node.stage_host.last_sent.get(s.session.id, (None, None))[1]
            s.tell(node, STAGE_ACTOR, Retransmit(s.term, s.version, s.session.id,
                                                 step.step if step is not None else 0, "forged"))
    await refused_by(s, [(n, "Retransmit") for n in s.stage_nodes], send)
    return [(n, "Retransmit") for n in s.stage_nodes]


async def token_out(s: Scene):
    seq = s.session.sequencer.next_seq

    def send():
        # the next token at the serving node, ending the answer; and a token into the ring at the head
        s.tell(s.serving, SERVE_ACTOR, TokenOut(s.term, s.version, s.session.id, seq, BOGUS_TOKEN, "stop"))
        s.tell(s.head, STAGE_ACTOR, TokenOut(s.term, s.version, s.session.id, seq + 5, BOGUS_TOKEN))
    await refused_by(s, [(s.serving, "TokenOut"), (s.head, "TokenOut")], send)
    return [(s.serving, "TokenOut"), (s.head, "TokenOut")]


async def stage_ready(s: Scene):
    victim = s.victim()
    await refused_by(s, [(s.coord, "StageReady")], lambda: s.tell(
        s.coord, COORD_ACTOR, StageReady(s.term, s.version, victim.node_id, ok=False, error="forged: out of memory")))
    assert victim.node_id not in s.coord.coordinator.load_failed
    return [(s.coord, "StageReady")]


def genuine_batch(s: Scene, of: str):
    """A CommitBatch ``of`` signed on the current plan, as an auditor is sent it
    (AuditRequest.batch)."""
    for by_stage in reversed(s.coord.verify.ledger.log.values()):
        for steps in by_stage.values():
            for _, batch in steps.values():
                if batch.node == of and (batch.term, batch.version) == (s.term, s.version):
                    return batch
    raise AssertionError(f"no batch of {of} on the current plan in the coordinator's log")


async def commit_batch(s: Scene):
    batch = genuine_batch(s, s.victim().node_id)
    await refused_by(s, [(s.coord, "CommitBatch")], lambda: s.tell(s.coord, VERIFY_ACTOR, batch))
    return [(s.coord, "CommitBatch")]


def failed_result(audit_id: int, rnd: int, auditor: str, node: str, session: str, step: int) -> AuditResult:
    return AuditResult(audit_id, rnd, auditor, node, session, step, False, "forged: outputs differ", 1.0, 1.0, "torch")


async def audit_report(s: Scene):
    victim = s.victim()
    auditor = next(n for n in s.honest if n is not victim).node_id
    report = AuditReport([failed_result(i, r, auditor, victim.node_id, s.session.id, 1) for i in range(1, 4)
                          for r in (1, 2)])
    await refused_by(s, [(s.coord, "AuditReport")], lambda: s.tell(s.coord, VERIFY_ACTOR, report))
    return [(s.coord, "AuditReport")]


async def wire_fault(s: Scene):
    victim = s.victim()
    index = next(i for i, n in enumerate(s.stage_nodes) if n is victim)
    receiver = s.stage_nodes[(index + 1) % len(s.stage_nodes)].node_id

    def send():  # in the receiver's name, then in its own: two strikes flag a node
        for reporter in (receiver, s.rogue.node_id):
            for step in (1, 2):
                s.tell(s.coord, VERIFY_ACTOR, WireFault(s.term, s.version, reporter, victim.node_id, s.session.id,
                                                        step, b"\1" * 32, b"\2" * 32))
    before = s.coord.forged.get("WireFault", 0)
    send()
    await s.mesh.wait_for(lambda: s.coord.forged.get("WireFault", 0) >= before + 4, what="the WireFaults refused")
    assert not s.coord.verify.ledger.strikes.get(victim.node_id)
    return [(s.coord, "WireFault")]


async def summary(s: Scene):
    forged = Summary(s.coord.cluster.term, 10**6, 0, 10**6, 10**6, 10**6, 0)
    await refused_by(s, [(n, "Summary") for n in s.honest],
                     lambda: [s.tell(n, VERIFY_ACTOR, forged) for n in s.honest])
    assert all(n.verify.summary != forged for n in s.honest)
    return [(n, "Summary") for n in s.honest]


def raft_barrage(s: Scene, src: str, term: int) -> list[RaftWire]:
    """What a voter could send to move a term, a vote or a leader: a vote request (pre and
    real), an Append (a heartbeat), and the two responses, all of ``term``."""
    last = max(len(n.cluster.election.log) for n in s.honest)
    return [RaftWire("vote", src, term, last + 10, term, flag=True), RaftWire("vote", src, term, last + 10, term),
            RaftWire("append", src, term, 0, 0, 0), RaftWire("append_resp", src, term, 0, 0),
            RaftWire("vote_resp", src, term, flag=True)]


def cluster_view(honest: list) -> list[tuple[int, str | None]]:
    return [(n.cluster.term, n.cluster.coordinator) for n in honest]


async def raft_from_a_learner(s: Scene):
    """Higher-term Raft traffic in the rogue's own name: it is a member, but no voter."""
    view = cluster_view(s.honest)
    term = max(t for t, _ in view) + 3
    before = [(n, n.cluster.forged.get("Heartbeat", 0)) for n in s.honest]
    for node in s.honest:
        for wire in raft_barrage(s, s.rogue.node_id, term):
            s.tell(node, CLUSTER_ACTOR, wire)
        # then a marker that is counted when refused: a link delivers in order, so once it is
        # refused every message of the barrage was stepped
        s.tell(node, CLUSTER_ACTOR, Heartbeat(s.victim().node_id, "x", "10.6.6.6", 6666, "torch", "", 0))
    await s.mesh.wait_for(lambda: all(n.cluster.forged.get("Heartbeat", 0) > b for n, b in before),
                          what="the barrage stepped")
    assert cluster_view(s.honest) == view
    return []


async def raft_in_a_voters_name(s: Scene):
    """Higher-term Raft traffic naming a voter as its src: refused as not the link's peer."""
    voter = s.victim().node_id
    term = max(n.cluster.term for n in s.honest) + 3
    targets = [n for n in s.honest if n.node_id != voter]
    before = [(n, sum(n.cluster.forged.values())) for n in targets]
    view = cluster_view(s.honest)
    for node in targets:
        for wire in raft_barrage(s, voter, term):
            s.tell(node, CLUSTER_ACTOR, wire)
    await s.mesh.wait_for(lambda: all(sum(n.cluster.forged.values()) >= b + 5 for n, b in before),
                          what="the Raft traffic in a voter's name refused")
    assert cluster_view(s.honest) == view
    return []


ATTACKS: dict[str, Attack] = {
    "EndSession": end_session, "StepLost": step_lost, "SessionFailed": session_failed, "Retransmit": retransmit,
    "TokenOut": token_out, "StageReady": stage_ready, "CommitBatch": commit_batch, "AuditReport": audit_report,
    "WireFault": wire_fault, "Summary": summary, "Raft-from-a-learner": raft_from_a_learner,
    "Raft-in-a-voters-name": raft_in_a_voters_name,
}


# -- refused -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ATTACKS))
def test_forged_message_is_refused_logged_and_the_session_gives_the_single_device_tokens(world, vrun, reference,
                                                                                          kind):
    mesh, honest, rogue = world
    with capture_logs() as logs:
        tokens, refusals = vrun(answer_under(mesh, honest, rogue, ATTACKS[kind]))
    assert tokens == reference.tokens(REQ)
    for node, what in refusals:  # each refusal is logged, with the rogue's id as the peer
        assert [e["node"] for e in forged_lines(logs, rogue.node_id, what)].count(node.node_id) >= 1, (node, what)
    if kind == "Raft-from-a-learner":
        lines = [e for e in logs if e.get("event") == "election.not_a_member_refused" and e.get("peer") == rogue.node_id]
        assert {e["message"] for e in lines} >= {"VoteRequest", "Append"}, lines
    if kind == "Raft-in-a-voters-name":
        lines = [e for e in logs if e.get("event") == "cluster.forged_message" and e.get("peer") == rogue.node_id]
        assert {e["kind"] for e in lines} == {"vote", "append", "append_resp", "vote_resp"}, lines
    assert not any(n.verify.flags for n in honest) and len(honest[0].plan.update.stages) == 3


def test_a_head_cannot_blame_a_serving_node_with_a_made_up_session(world, vrun):
    """The head stage takes its prefills from any serving node, so a WireFault from it may
    accuse any member, but only as the serving node of a session the judge knows: two
    reports about a session no one serves used to flag an honest node."""
    mesh, honest, _ = world
    coord = mesh.coordinator()
    plan = coord.plan.update
    head = next(n for n in honest if n.node_id == plan.stages[0].node)
    assert head is not coord, "seed: the head must not coordinate (a coordinator's own reports are its judgement)"
    victim = next(n for n in honest if n is not head and n is not coord)

    async def attack():
        before = coord.forged.get("WireFault", 0)
        for step in (0, 1):
            head.system.ref(coord.node_id, VERIFY_ACTOR).tell(WireFault(
                plan.term, plan.version, head.node_id, victim.node_id, "made-up-session", step, b"\1" * 32, b"\2" * 32))
        await mesh.wait_for(lambda: coord.forged.get("WireFault", 0) >= before + 2 or bool(coord.verify.ledger.flagged),
                            what="the WireFaults judged")

    with capture_logs() as logs:
        vrun(attack())
    assert not coord.verify.ledger.strikes.get(victim.node_id) and not coord.verify.ledger.flagged
    assert len(forged_lines(logs, head.node_id, "WireFault")) == 2


# -- the same attacks with the check switched off: the damage happens -----------------------------


@pytest.fixture
def binding_off(monkeypatch):
    monkeypatch.setattr(binding, "refusal", lambda msg, peer, view: None)


class FlagSpy:
    """The coordinator's ledger flags through this instead of evicting: what it would flag."""

    def __init__(self, monkeypatch, coord) -> None:
        self.ledger = coord.verify.ledger
        self.flags: list[str] = []
        monkeypatch.setattr(self.ledger, "flag", lambda flag: self.flags.append(flag.node))

    def forget(self) -> None:
        """Leave the ledger as it was: nobody flagged, no strikes."""
        for node in self.flags:
            self.ledger.flagged.pop(node, None)
            self.ledger.strikes.pop(node, None)


def test_without_the_binding_a_forged_summary_rewrites_every_nodes_counters(world, vrun, binding_off):
    mesh, honest, rogue = world

    async def attack():
        forged = Summary(mesh.coordinator().cluster.term, 10**6, 0, 10**6, 10**6, 10**6, 0)
        for n in honest:
            rogue.system.ref(n.node_id, VERIFY_ACTOR).tell(forged)
        await mesh.wait_for(lambda: all(n.verify.summary == forged for n in honest if n is not mesh.coordinator()),
                            what="the forged counters shown")

    vrun(attack())


def tap_lost_marks(session) -> list[int]:
    """Every value the serving side gives ``session.links_lost_mark`` from now on (the next
    token resets it: the mark a StepLost leaves lasts one step)."""
    marks: list[int] = []

    class Tapped(type(session)):
        @property
        def links_lost_mark(self) -> int:
            return self.__dict__["links_lost_mark"]

        @links_lost_mark.setter
        def links_lost_mark(self, value: int) -> None:
            marks.append(value)
            self.__dict__["links_lost_mark"] = value

    session.__class__ = Tapped
    return marks


def test_without_the_binding_a_step_lost_makes_a_healthy_session_replayable(world, vrun, binding_off):
    mesh, honest, rogue = world
    seen: list[int] = []

    async def attack(s: Scene):
        marks = tap_lost_marks(s.session)
        s.tell(s.serving, SERVE_ACTOR, StepLost(s.term, s.version, s.session.id, 1))
        await mesh.wait_for(lambda: -1 in marks, what="the session marked lost")
        seen.extend(marks)

    vrun(answer_under(mesh, honest, rogue, attack))
    assert -1 in seen  # "something was lost": check_stalls replays it from its prompt if it is slow


def test_without_the_binding_a_replayed_commit_batch_counts_again(world, vrun, binding_off, monkeypatch):
    mesh, honest, rogue = world
    coord = mesh.coordinator()
    ledger = coord.verify.ledger
    own, counted = ledger.on_batch, []

    def on_batch(batch, *args):
        before = ledger.commitments
        own(batch, *args)
        counted.append((batch.signature, ledger.commitments - before))

    monkeypatch.setattr(ledger, "on_batch", on_batch)

    async def attack():
        batch = genuine_batch(Scene(mesh, honest, rogue, coord, None), next(
            n for n in honest if n is not coord and n.node_id in {e.node for e in coord.plan.update.stages}).node_id)
        rogue.system.ref(coord.node_id, VERIFY_ACTOR).tell(batch)
        await mesh.wait_for(lambda: any(sig == batch.signature for sig, _ in counted), what="the replay judged")
        return batch

    batch = vrun(attack())
    # commitments no stage computed again, counted again (and its chain links, and its audits)
    assert (batch.signature, len(batch.records)) in counted


def test_without_the_checks_a_retransmit_makes_a_stage_send_its_step_again(world, vrun, reference, binding_off,
                                                                          monkeypatch):
    mesh, honest, rogue = world
    own = StageHost.on_retransmit
    # the stage host's own check: the asker must be the node the step went to
    monkeypatch.setattr(StageHost, "on_retransmit",
                        lambda self, msg, peer=None: own(self, msg, self.last_sent.get(msg.session, (peer,))[0]))

    async def attack(s: Scene):
        host = s.head.stage_host
        before = host.stats.retransmits_sent
        step = host.last_sent[s.session.id][1].step
        s.tell(s.head, STAGE_ACTOR, Retransmit(s.term, s.version, s.session.id, step, "forged"))
        await mesh.wait_for(lambda: host.stats.retransmits_sent > before, what="the step sent again")

    tokens, _ = vrun(answer_under(mesh, honest, rogue, attack))
    assert tokens == reference.tokens(REQ)  # the damage is work: every later stage computes that step again


def test_without_the_checks_a_retransmit_of_the_prefill_fails_the_session(world, vrun, binding_off, monkeypatch):
    mesh, honest, rogue = world
    own = Serving.on_retransmit
    # the serving side's own check: only the head may ask for the prefill again
    monkeypatch.setattr(Serving, "on_retransmit",
                        lambda self, msg, peer=None: own(self, msg, self.plan().stage_nodes[0] if self.plan() else peer))

    async def attack(s: Scene):
        s.tell(s.serving, STAGE_ACTOR, Retransmit(s.term, s.version, s.session.id, 0, "forged"))

    with pytest.raises(SessionError):
        vrun(answer_under(mesh, honest, rogue, attack))


def test_without_the_check_an_end_session_stalls_the_answer(world, vrun, binding_off, monkeypatch):
    mesh, honest, rogue = world
    own = StageHost.on_end
    # the stage host's own check: only the session's serving node ends it
    monkeypatch.setattr(StageHost, "on_end", lambda self, msg, peer=None: own(
        self, msg, self.meta[msg.session].serve_node if msg.session in self.meta else peer))

    async def scenario():
        async def attack(s: Scene):
            for node in s.stage_nodes:
                s.tell(node, STAGE_ACTOR, EndSession(s.session.id))
            await mesh.wait_for(lambda: all(s.session.id not in n.stage_host.meta for n in s.stage_nodes),
                                what="the session ended at every stage")

        answer = asyncio.ensure_future(answer_under(mesh, honest, rogue, attack))
        try:
            # far longer than the whole answer takes: it never completes
            done, _ = await asyncio.wait([answer], timeout=20.0)
            return bool(done)
        finally:
            answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)

    assert vrun(scenario()) is False


def test_without_the_binding_a_session_failed_fails_the_answer(world, vrun, binding_off):
    mesh, honest, rogue = world

    async def attack(s: Scene):
        s.tell(s.serving, SERVE_ACTOR, SessionFailed(s.term, s.version, s.session.id, "forged: the stage failed"))

    with pytest.raises(SessionError, match="forged"):
        vrun(answer_under(mesh, honest, rogue, attack))


def test_without_the_binding_a_token_out_puts_words_in_the_models_mouth(world, vrun, reference, binding_off):
    mesh, honest, rogue = world

    async def attack(s: Scene):
        s.tell(s.serving, SERVE_ACTOR, TokenOut(s.term, s.version, s.session.id, s.session.sequencer.next_seq,
                                                BOGUS_TOKEN, "length"))

    tokens, _ = vrun(answer_under(mesh, honest, rogue, attack))
    want = reference.tokens(REQ)
    assert tokens != want and tokens == [*want[:1], BOGUS_TOKEN]  # the rogue's token, and the answer cut short


def test_without_the_check_a_learner_takes_the_lead_with_one_append(world, vrun, monkeypatch):
    mesh, honest, rogue = world
    monkeypatch.setattr(Election, "_may_speak", lambda self, m: True)

    async def attack():
        term = max(n.cluster.term for n in honest) + 3
        for n in honest:
            rogue.system.ref(n.node_id, CLUSTER_ACTOR).tell(RaftWire("append", rogue.node_id, term, 0, 0, 0))
        await mesh.wait_for(lambda: all(n.cluster.coordinator == rogue.node_id for n in honest),
                            what="every node following the rogue")
        monkeypatch.undo()
        await settled(mesh, honest)  # the rogue sends nothing more: the voters elect again

    vrun(attack())


def test_without_the_check_an_append_in_a_voters_name_deposes_the_coordinator(world, vrun, monkeypatch):
    mesh, honest, rogue = world
    monkeypatch.setattr(ClusterService, "_bound", lambda self, msg, claimed, peer: True)

    async def attack():
        coord = mesh.coordinator()
        voter = next(n for n in honest if n is not coord)
        term = max(n.cluster.term for n in honest) + 3
        rogue.system.ref(coord.node_id, CLUSTER_ACTOR).tell(RaftWire("append", voter.node_id, term, 0, 0, 0))
        await mesh.wait_for(lambda: coord.cluster.coordinator == voter.node_id and coord.cluster.term == term,
                            what="the coordinator deposed, following the forged voter")
        monkeypatch.undo()
        await settled(mesh, honest)

    vrun(attack())


async def settled(mesh: InProcessMesh, honest: list) -> None:
    """Until an honest coordinator leads every honest node, on a ready plan of its term."""
    def led() -> bool:
        coord = mesh.coordinator()
        return coord is not None and coord in honest and all(
            n.cluster.coordinator == coord.node_id and n.plan.ready and n.plan.epoch.term == coord.cluster.term
            for n in honest)

    await mesh.wait_for(led, timeout=60.0, what="an honest coordinator elected again")
    await mesh.wait_ready(stages=3)


def test_without_the_binding_forged_audit_results_flag_an_honest_node(world, vrun, binding_off, monkeypatch):
    mesh, honest, rogue = world
    coord = mesh.coordinator()
    spy = FlagSpy(monkeypatch, coord)
    own_send = spy.ledger.send

    def send(node, actor, msg):
        # the moment the coordinator asks an auditor, the rogue answers first in its name: failed
        if isinstance(msg, AuditRequest) and not spy.flags:
            report = AuditReport([failed_result(aid, msg.round, node, msg.batch.node, msg.session, step)
                                  for aid, step in zip(msg.audit_ids, msg.steps)])
            rogue.system.ref(coord.node_id, VERIFY_ACTOR).tell(report)
        own_send(node, actor, msg)

    monkeypatch.setattr(spy.ledger, "send", send)

    async def attack():
        await mesh.tokens(REQ.prompt, node=0, max_tokens=TOKENS)
        await mesh.wait_for(lambda: bool(spy.flags), timeout=60.0, what="an honest node flagged")

    try:
        vrun(attack())
        assert spy.flags[0] in {n.node_id for n in honest}
    finally:
        spy.forget()


def test_without_the_binding_forged_wire_faults_flag_an_honest_node(world, vrun, binding_off, monkeypatch):
    mesh, honest, rogue = world
    coord = mesh.coordinator()
    spy = FlagSpy(monkeypatch, coord)
    s = Scene(mesh, honest, rogue, coord, None)
    victim = s.victim()

    async def attack():
        for step in (1, 2):
            rogue.system.ref(coord.node_id, VERIFY_ACTOR).tell(WireFault(
                s.term, s.version, rogue.node_id, victim.node_id, "any", step, b"\1" * 32, b"\2" * 32))
        await mesh.wait_for(lambda: bool(spy.flags), what="the victim flagged")

    try:
        vrun(attack())
        assert spy.flags == [victim.node_id]
    finally:
        spy.forget()


def test_without_the_binding_a_forged_stage_ready_evicts_a_node(world, vrun, binding_off):
    """Last: the victim leaves the plan for good (until it rejoins)."""
    mesh, honest, rogue = world

    async def attack():
        coord = mesh.coordinator()
        s = Scene(mesh, honest, rogue, coord, None)
        victim = s.victim()
        rogue.system.ref(coord.node_id, COORD_ACTOR).tell(
            StageReady(s.term, s.version, victim.node_id, ok=False, error="forged: out of memory"))
        await mesh.wait_for(lambda: victim.node_id not in {e.node for e in coord.plan.update.stages},
                            what="the victim out of the plan")

    vrun(attack())
