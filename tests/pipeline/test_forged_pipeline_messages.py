"""mesh.binding: who may send what, given the authenticated peer (issue 17, part 1).

Each test is a forged message a rogue member (a key holding the cluster secret) sends."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from actors import NodeIdentity
from kernels.digest import tensor_digest
from kernels.sampling import GREEDY
from mesh.binding import View, refusal
from mesh.pipeline.messages import (
    EndSession,
    Forward,
    PlanReady,
    PlanUpdate,
    Retransmit,
    SessionFailed,
    SessionMeta,
    StageEntry,
    StageReady,
    StepLost,
    TokenOut,
)
from mesh.pipeline.plan import Epoch
from mesh.pipeline.stage_host import StageHost
from mesh.verify.ledger import auditor_order
from mesh.verify.messages import (
    AuditFetch,
    AuditReport,
    AuditRequest,
    AuditResult,
    CommitBatch,
    NodeFlagged,
    Summary,
    WireFault,
)
from mesh.verify.recorder import StageRecorder

COORD, A, B, C, ROGUE = "coord", "a", "b", "c", "rogue"
PLAN = PlanUpdate(3, 7, COORD, "m", [StageEntry(0, A, 0, 10, "cpu"), StageEntry(1, B, 10, 20, "cpu"),
                                     StageEntry(2, C, 20, 30, "cpu")])


def view(me: str = B) -> View:
    return View(me, 3, COORD, PLAN)


def test_plan_update_with_a_huge_version_from_a_non_coordinator_is_refused() -> None:
    hijack = PlanUpdate(3, 10**9, ROGUE, "m", [StageEntry(0, ROGUE, 0, 30, "cpu")])
    assert refusal(hijack, ROGUE, view())
    naming_the_coordinator = PlanUpdate(3, 10**9, COORD, "m", [StageEntry(0, ROGUE, 0, 30, "cpu")])
    assert refusal(naming_the_coordinator, ROGUE, view())
    assert refusal(PlanReady(3, 10**9), ROGUE, view())
    assert refusal(PLAN, COORD, view()) is None and refusal(PlanReady(3, 7), COORD, view()) is None


def test_coordinator_messages_of_another_term_are_refused() -> None:
    assert refusal(PlanUpdate(4, 1, COORD, "m", []), COORD, view())
    assert refusal(PlanReady(2, 7), COORD, view())
    assert refusal(PlanUpdate(3, 1, COORD, "m", []), COORD, View(B, 3, None, None))


def test_one_node_flagged_from_a_member_does_not_evict() -> None:
    flag = NodeFlagged(3, A, "audit failed", json.dumps({}))
    assert refusal(flag, ROGUE, view()) and refusal(flag, A, view())
    assert refusal(NodeFlagged(4, A, "x", "{}"), COORD, view())
    assert refusal(flag, COORD, view()) is None


def test_forged_summary_is_refused() -> None:
    summary = Summary(3, 0, 0, 0, 0, 0, 0)
    assert refusal(summary, ROGUE, view()) and refusal(summary, COORD, view()) is None


def test_stage_ready_for_another_node_is_refused() -> None:
    assert refusal(StageReady(3, 7, A, True), ROGUE, view(COORD))
    assert refusal(StageReady(3, 7, A, True), A, view(COORD)) is None


def forward(sender: str) -> Forward:
    return Forward(3, 7, "s", 0, 0, sender, b"")


def test_forward_only_from_the_previous_stage() -> None:
    assert refusal(forward(A), ROGUE, view(B))  # claims to be stage 0
    assert refusal(forward(ROGUE), ROGUE, view(B))  # honest about itself, but not stage 0
    assert refusal(forward(C), C, view(B))
    assert refusal(forward(A), A, view(B)) is None
    assert refusal(forward(ROGUE), ROGUE, view(A)) is None  # the head takes new sessions from serving nodes


def test_token_out_only_from_the_last_stage() -> None:
    token = TokenOut(3, 7, "s", 0, 42)
    assert refusal(token, ROGUE, view(A)) and refusal(token, B, view(A))
    assert refusal(token, ROGUE, View(A, 3, COORD, None))
    assert refusal(token, C, view(A)) is None


@pytest.mark.parametrize("msg", [PLAN, PlanReady(3, 7), NodeFlagged(3, A, "", "{}"), TokenOut(3, 7, "s", 0, 1)])
def test_local_messages_are_not_checked(msg) -> None:
    assert refusal(msg, None, View(B, 0, None, None)) is None


def result(auditor: str, round_: int = 2, ok: bool = False, inconclusive: bool = False) -> AuditResult:
    return AuditResult(11, round_, auditor, A, "s", 4, ok, "forged", 1.0, 1.0, "torch", inconclusive)


def test_first_auditor_cannot_report_round_two_in_the_second_auditors_name() -> None:
    # the second auditor of a step is public (auditor_order) and round 2 reuses the audit id
    assert refusal(AuditReport([result(C)]), B, view(COORD))
    assert refusal(AuditReport([result(B, 1, ok=True), result(C)]), B, view(COORD))  # one forged row spoils it
    assert refusal(AuditReport([result(C)]), C, view(COORD)) is None


def test_audited_node_cannot_spray_inconclusive_results() -> None:
    spray = AuditReport([result(B, 1, inconclusive=True), result(C, 1, inconclusive=True)])
    assert refusal(spray, A, view(COORD))


def test_wire_fault_reported_in_another_nodes_name_is_refused() -> None:
    fault = WireFault(3, 7, C, A, "s", 0, b"x", b"y")  # "C received corrupt bytes from A"
    assert refusal(fault, ROGUE, view(COORD)) and refusal(fault, B, view(COORD))
    assert refusal(fault, C, view(COORD))  # C takes its Forwards from B, not A
    assert refusal(WireFault(3, 7, C, B, "s", 0, b"x", b"y"), C, view(COORD)) is None


def test_a_member_cannot_flag_a_node_with_wire_faults_in_its_own_name() -> None:
    # two reports flag their subject: only the stage that receives its bytes may report it
    assert refusal(WireFault(3, 7, ROGUE, A, "s", 0, b"x", b"y"), ROGUE, view(COORD))  # holds no stage
    assert refusal(WireFault(3, 8, C, B, "s", 0, b"x", b"y"), C, view(COORD))  # another plan
    # the head may accuse a serving node, which any member may be: the session's, where known
    knows = View(COORD, 3, COORD, PLAN, serve_node=lambda s: ROGUE)
    assert refusal(WireFault(3, 7, A, ROGUE, "s", 0, b"x", b"y"), A, knows) is None


def test_commit_batch_of_another_node_and_audit_request_from_a_member_are_refused() -> None:
    batch = CommitBatch(3, 7, 0, 0, 10, A, b"k", "torch", "quant", b"w", [], b"r", b"s")
    assert refusal(batch, ROGUE, view(COORD)) and refusal(batch, A, view(COORD)) is None
    request = AuditRequest([1], 1, "s", [0], batch, [], 3)
    assert refusal(request, ROGUE, view(C)) and refusal(request, A, view(C))
    assert refusal(request, COORD, view(C)) is None


# -- audit fetches: only the auditors the schedule picks read a stage's inputs -----------------

MEMBERS = {A: "torch", B: "torch", C: "torch", COORD: "torch", ROGUE: "torch"}


def fetchers_of_stage_0(fetch: AuditFetch) -> list[str]:
    """What `VerifyService.fetchers` answers on A, stage 0's node: the schedule's first two."""
    return auditor_order(0, A, "torch", MEMBERS)[:2]


def test_audit_fetch_of_the_prompt_from_a_member_that_is_not_its_auditor_is_refused() -> None:
    fetch = AuditFetch(3, 7, "s", 0, 0)
    auditors = auditor_order(0, A, "torch", MEMBERS)
    at_a = View(A, 3, COORD, PLAN, fetchers=fetchers_of_stage_0)
    for outsider in auditors[2:]:
        assert refusal(fetch, outsider, at_a)
    assert refusal(fetch, auditors[0], at_a) is None and refusal(fetch, auditors[1], at_a) is None  # round 1, 2
    assert refusal(fetch, ROGUE, View(A, 3, COORD, PLAN)) is None  # holds no such steps: nothing to read


def test_audit_fetchers_are_the_auditors_of_the_stage_that_committed_the_steps() -> None:
    recorder = StageRecorder(NodeIdentity.generate(), lambda *a: True, lambda: COORD, backend="torch",
                             weight_mode="float32")
    recorder.entry = StageEntry(2, A, 20, 30, "torch")
    tokens = np.array([1, 2], dtype=np.int32)
    recorder.on_sent(Forward(3, 7, "s", 0, 0, B, tensor_digest(tokens), tokens=tokens), np.zeros((2, 4), np.float32),
                     b"d")
    recorder.entry = StageEntry(0, A, 0, 10, "torch")  # a later plan: the old session keeps its stage
    assert recorder.stage_of("s", Epoch(3, 7)).index == 2 and recorder.stage_of("s", Epoch(3, 8)) is None


# -- StepLost, SessionFailed, Retransmit: from the stages of the plan --------------------------


@pytest.mark.parametrize("msg", [StepLost(3, 7, "s", 4), SessionFailed(3, 7, "s", "forged: bad input")],
                         ids=["step_lost", "session_failed"])
def test_a_member_outside_the_plan_cannot_fail_or_replay_a_session(msg) -> None:
    serving = view(ROGUE + "-victim")
    assert refusal(msg, ROGUE, serving)  # holds no stage
    assert refusal(type(msg)(3, 6, *list(msg.__dict__.values())[2:]), B, serving)  # another plan
    assert refusal(msg, B, serving) is None


def test_retransmit_only_from_the_next_stage_or_the_head() -> None:
    assert refusal(Retransmit(3, 7, "s", 0, "x"), ROGUE, view(A))
    assert refusal(Retransmit(3, 7, "s", 0, "x"), C, view(A))  # stage 2 takes its Forwards from B, not A
    assert refusal(Retransmit(3, 7, "s", 0, "x"), B, view(A)) is None
    assert refusal(Retransmit(3, 7, "s", 0, "x"), A, view(ROGUE)) is None  # the head, to a serving node
    assert refusal(Retransmit(3, 8, "s", 0, "x"), B, view(A))


def test_stage_resends_a_step_only_to_the_node_it_went_to() -> None:
    sent: list = []
    host = StageHost(B, Path("unused"), backend="torch", weight_mode="float32", runner=None,
                     send=lambda *m: sent.append(m) or True)
    host.epoch = Epoch(3, 7)
    step = Forward(3, 7, "s", 5, 9, B, b"d")
    host.last_sent["s"] = (C, step)
    host.on_retransmit(Retransmit(3, 7, "s", 5, "forged"), A)
    assert sent == []
    host.on_retransmit(Retransmit(3, 7, "s", 5, "digest mismatch"), C)
    assert sent == [(C, "stage", step)]


# -- EndSession: only from the session's serving node (checked by the stage host) -------------

def _host_with_session(serve_node: str) -> StageHost:
    host = StageHost(B, Path("unused"), backend="torch", weight_mode="float32", runner=None, send=lambda *m: True)
    host.epoch, host.entry, host.stages = Epoch(3, 7), PLAN.stages[1], list(PLAN.stages)
    host.meta["s"] = SessionMeta(serve_node, 2, 8, GREEDY)
    return host


def test_end_session_from_a_node_that_does_not_serve_it_is_refused() -> None:
    host = _host_with_session(A)
    assert host.on_end(EndSession("s"), ROGUE) and "s" in host.meta
    assert host.on_end(EndSession("s"), A) is None and "s" not in host.meta


def test_end_session_sent_before_the_prefill_does_not_kill_a_session_served_by_another_node() -> None:
    host = _host_with_session(A)
    del host.meta["s"]
    assert host.on_end(EndSession("s"), ROGUE) is None  # not seen yet: kept with its sender
    hidden = np.zeros((2, 4), np.float32)
    prefill = Forward(3, 7, "s", 0, 0, A, tensor_digest(hidden), hidden=hidden, meta=SessionMeta(C, 2, 8, GREEDY))
    host.on_forward(prefill)
    assert "s" in host.meta and host.queue.qsize() == 1  # the session goes on
    host.on_end(EndSession("t"), C)  # the honest overtaking end still holds
    host.on_forward(Forward(3, 7, "t", 0, 0, A, tensor_digest(hidden), hidden=hidden,
                            meta=SessionMeta(C, 2, 8, GREEDY)))
    assert "t" not in host.meta and host.queue.qsize() == 1


# -- the head: the serving node is bound to who sent the prompt -------------------------------


def test_head_cannot_blame_a_node_that_does_not_serve_the_session() -> None:
    # two WireFaults flag their subject; at the head any member may have sent the bytes
    fault = WireFault(3, 7, A, ROGUE, "s", 0, b"x", b"y")
    knows = View(COORD, 3, COORD, PLAN, serve_node=lambda s: C)
    assert refusal(fault, A, knows)
    assert refusal(WireFault(3, 7, A, C, "s", 0, b"x", b"y"), A, knows) is None


def test_head_cannot_blame_a_serving_node_with_a_made_up_session() -> None:
    # a session the judge knows no serving node of: a made-up id (the old rule let it pass)
    made_up = WireFault(3, 7, A, C, "made-up", 0, b"x", b"y")
    assert refusal(made_up, A, view(COORD))
    assert refusal(made_up, A, View(COORD, 3, COORD, PLAN, serve_node=lambda s: None))


def test_prefill_naming_another_serving_node_is_refused_at_the_head() -> None:
    tokens = np.array([1, 2], dtype=np.int32)
    prefill = Forward(3, 7, "s", 0, 0, ROGUE, tensor_digest(tokens), tokens=tokens, meta=SessionMeta(C, 2, 8, GREEDY))
    assert refusal(prefill, ROGUE, view(A))
    honest = Forward(3, 7, "s", 0, 0, C, tensor_digest(tokens), tokens=tokens, meta=SessionMeta(C, 2, 8, GREEDY))
    assert refusal(honest, C, view(A)) is None
