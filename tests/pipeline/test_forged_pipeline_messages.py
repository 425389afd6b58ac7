"""mesh.binding: who may send what, given the authenticated peer (issue 17, part 1).

Each test is a forged message a rogue member (a key holding the cluster secret) sends."""

from __future__ import annotations

import json

import pytest

from mesh.binding import View, refusal
from mesh.pipeline.messages import Forward, PlanReady, PlanUpdate, StageEntry, StageReady, TokenOut
from mesh.verify.messages import AuditReport, AuditRequest, AuditResult, CommitBatch, NodeFlagged, Summary, WireFault

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
    assert refusal(WireFault(3, 7, A, ROGUE, "s", 0, b"x", b"y"), A, view(COORD)) is None  # head: a serving node


def test_commit_batch_of_another_node_and_audit_request_from_a_member_are_refused() -> None:
    batch = CommitBatch(3, 7, 0, 0, 10, A, b"k", "torch", "quant", b"w", [], b"r", b"s")
    assert refusal(batch, ROGUE, view(COORD)) and refusal(batch, A, view(COORD)) is None
    request = AuditRequest([1], 1, "s", [0], batch, [], 3)
    assert refusal(request, ROGUE, view(C)) and refusal(request, A, view(C))
    assert refusal(request, COORD, view(C)) is None
