"""The coordinator's ledger and the stage's wire check, driven directly (no sockets, no model)."""

from __future__ import annotations

import numpy as np

from actors import NodeIdentity
from kernels.digest import tensor_digest
from mesh.pipeline.messages import Forward, Retransmit, StageEntry
from mesh.pipeline.plan import Epoch
from mesh.pipeline.stage_host import StageHost
from mesh.verify.commitment import forward_bytes, sign_batch
from mesh.testing.faults import parse_fault
from mesh.verify.ledger import Ledger
from mesh.verify.messages import AuditRequest, AuditResult, CommitBatch, StepRecord, WireFault
from mesh.verify.recorder import StageRecorder

EPOCH = Epoch(1, 1)


class Net:
    def __init__(self):
        self.sent: list[tuple[str, str, object]] = []

    def __call__(self, node, actor, msg):
        self.sent.append((node, actor, msg))

    def of(self, kind):
        return [m for _, _, m in self.sent if isinstance(m, kind)]


def _plan(ids):
    return [StageEntry(i, n.node_id, 10 * i, 10 * i + 10, "torch") for i, n in enumerate(ids)]


def _d(tag: str, step: int) -> bytes:
    return f"{tag}{step}".encode().ljust(32, b".")


def _batches(ident, stage, steps, out_of=lambda s: _d("out", s), in_of=lambda s: _d("in", s), upstream=None,
             session="s", version=1):
    """Step s at position s; past stage 0, each input signed by ``upstream`` (the stage before)."""
    def signed(s):
        if upstream is None:
            return b""
        return upstream.sign(forward_bytes(1, version, session, s, s, upstream.node_id, in_of(s)))

    records = [StepRecord(session, s, s, 1, in_of(s), out_of(s), -1, signed(s)) for s in steps]
    return sign_batch(ident, term=1, version=version, stage=stage, start=10 * stage, end=10 * stage + 10,
                      backend="torch", weight_mode="float32", weights_digest=b"w" * 32, records=records,
                      upstream_key=upstream.public_key if upstream is not None else b"")


def _all_audited():
    """Three torch nodes and a ledger in office that audits every step."""
    ids = [NodeIdentity.generate() for _ in range(3)]
    net, flags = Net(), []
    ledger = Ledger("c", net, flags.append, audit_rate=1.0)
    ledger.take_office(1)
    return ids, net, flags, ledger, {i.node_id: "torch" for i in ids}


def test_selection_rate_links_and_a_forged_batch():
    ids = [NodeIdentity.generate() for _ in range(3)]
    net, flags = Net(), []
    ledger = Ledger("c", net, flags.append, audit_rate=0.2)
    ledger.take_office(1)
    members = {i.node_id: ("mlx" if k == 2 else "torch") for k, i in enumerate(ids)}
    plan = _plan(ids)
    steps = list(range(2000))
    # stage 0's outputs are stage 1's inputs: every link verifies
    ledger.on_batch(_batches(ids[0], 0, steps), EPOCH, plan, members)
    ledger.on_batch(_batches(ids[1], 1, steps, in_of=lambda s: _d("out", s), upstream=ids[0]), EPOCH, plan, members)
    assert ledger.commitments == 4000
    assert ledger.verified_links == 2000 and ledger.broken_links == 0
    requests = net.of(AuditRequest)
    assert len(requests) == 2  # one per batch, for all its selected steps
    assert 0.17 < sum(len(r.steps) for r in requests) / 4000 < 0.23
    assert all(len(r.audit_ids) == len(r.steps) == len(set(r.audit_ids)) for r in requests)
    assert all(members[n] == "mlx" for n, _, m in net.sent if isinstance(m, AuditRequest))  # other backend first
    assert all(r.batch.node != n for n, _, r in net.sent if isinstance(r, AuditRequest))
    # a batch for stage 2 signed by node 0: rejected, nothing recorded
    ledger.on_batch(_batches(ids[0], 2, [0]), EPOCH, plan, members)
    assert ledger.rejected == 1 and ledger.commitments == 4000


def test_a_failed_audit_escalates_and_two_failures_flag():
    ids, net, flags, ledger, members = _all_audited()
    ledger.on_batch(_batches(ids[1], 1, [0], upstream=ids[0]), EPOCH, _plan(ids), members)
    (first_auditor, _, req), = [(n, a, m) for n, a, m in net.sent if isinstance(m, AuditRequest)]

    def result(auditor, rnd, ok):
        return AuditResult(req.audit_ids[0], rnd, auditor, ids[1].node_id, "s", 0, ok, "ok" if ok else "outside",
                           0.01, 0.0, "torch")

    ledger.on_result(result(first_auditor, 1, False), members)
    second = [(n, m) for n, _, m in net.sent if isinstance(m, AuditRequest) and m.round == 2]
    assert len(second) == 1 and second[0][0] not in (first_auditor, ids[1].node_id)
    assert not flags
    ledger.on_result(result(second[0][0], 2, False), members)
    assert [f.node for f in flags] == [ids[1].node_id]
    assert len(flags[0].evidence["audits"]) == 2 and flags[0].evidence["batch"]["signature"]


def test_a_failed_audit_that_the_second_auditor_clears_does_not_flag():
    ids, net, flags, ledger, members = _all_audited()
    ledger.on_batch(_batches(ids[1], 1, [0], upstream=ids[0]), EPOCH, _plan(ids), members)
    req = net.of(AuditRequest)[0]
    first = next(n for n, _, m in net.sent if m is req)
    ledger.on_result(AuditResult(req.audit_ids[0], 1, first, ids[1].node_id, "s", 0, False, "x", 1, 1, "torch"),
                     members)
    second = next(n for n, _, m in net.sent if isinstance(m, AuditRequest) and m.round == 2)
    ledger.on_result(AuditResult(req.audit_ids[0], 2, second, ids[1].node_id, "s", 0, True, "ok", 0, 0, "torch"), members)
    assert not flags and ledger.audits == 2 and ledger.audit_failures == 1


def test_one_report_escalates_its_failures_in_one_request_and_a_result_for_another_step_is_ignored():
    ids, net, flags, ledger, members = _all_audited()
    ledger.on_batch(_batches(ids[1], 1, range(4), upstream=ids[0]), EPOCH, _plan(ids), members)
    req, = net.of(AuditRequest)
    first = next(n for n, _, m in net.sent if m is req)

    def results(auditor, rnd, oks, request):
        return [AuditResult(aid, rnd, auditor, ids[1].node_id, "s", step, ok, "ok" if ok else "outside", 0, 0,
                            "torch") for aid, step, ok in zip(request.audit_ids, request.steps, oks)]

    wrong_step = AuditResult(req.audit_ids[0], 1, first, ids[1].node_id, "s", 3, True, "ok", 0, 0, "torch")
    ledger.on_results([wrong_step], members)  # an audit id answered for another step: not counted
    assert ledger.audits == 0 and len(ledger.pending) == 4
    ledger.on_results(results(first, 1, [True, False, True, False], req), members)
    escalation, = [m for m in net.of(AuditRequest) if m.round == 2]
    assert escalation.steps == [1, 3] and escalation.audit_ids == [req.audit_ids[1], req.audit_ids[3]]
    assert ledger.audits == 4 and ledger.audit_failures == 2 and not flags
    second = next(n for n, _, m in net.sent if m is escalation)
    ledger.on_results(results(second, 2, [False, False], escalation), members)
    assert [f.node for f in flags] == [ids[1].node_id]  # flagged once, with the first pair of failures
    assert [a["step"] for a in flags[0].evidence["audits"]] == [1, 1]
    assert not ledger.pending


def test_corrupt_wire_is_caught_on_the_same_step_and_flags_the_sender():
    sender, receiver = NodeIdentity.generate(), NodeIdentity.generate()
    net = Net()
    recorder = StageRecorder(receiver, net, lambda: "coord", backend="torch", weight_mode="float32")
    host = StageHost(receiver.node_id, None, backend="torch", weight_mode="float32", runner=None, send=net,
                     observer=recorder)
    host.epoch, host.entry = EPOCH, StageEntry(1, receiver.node_id, 10, 20, "torch")
    wire = parse_fault("corrupt-wire").wire
    for step in (5, 6):
        hidden = np.random.default_rng(step).standard_normal((1, 576)).astype(np.float32)
        host.on_forward(Forward(1, 1, "s", step, 40 + step, sender.node_id, tensor_digest(hidden),
                                hidden=wire(hidden)))
        assert host.queue.empty()  # never computed on
        retransmit = net.of(Retransmit)[-1]
        report = net.of(WireFault)[-1]
        assert retransmit.step == step and report.step == step and report.sender == sender.node_id
    flags = []
    ledger = Ledger("coord", Net(), flags.append)
    ledger.take_office(1)
    for report in net.of(WireFault):
        ledger.on_wire_fault(report)
    assert [f.node for f in flags] == [sender.node_id]


def test_a_log_that_starts_mid_session_is_not_audited():
    """A coordinator that took office mid-session lacks the early commitments: it cannot
    check the inputs an auditor would fetch, so it must not ask (nor accuse)."""
    ids = [NodeIdentity.generate() for _ in range(3)]
    net, flags = Net(), []
    ledger = Ledger("c", net, flags.append, audit_rate=1.0)
    ledger.take_office(2)
    members = {i.node_id: "torch" for i in ids}
    ledger.on_batch(_batches(ids[1], 1, range(8, 16), upstream=ids[0]), EPOCH, _plan(ids), members)
    assert not net.of(AuditRequest) and ledger.unauditable == 8


def test_requests_carry_only_records_the_auditor_was_not_sent_and_an_escalation_carries_all():
    ids, net, flags, ledger, members = _all_audited()
    ledger.on_batch(_batches(ids[1], 1, range(0, 8), upstream=ids[0]), EPOCH, _plan(ids), members)
    ledger.on_batch(_batches(ids[1], 1, range(8, 12), upstream=ids[0]), EPOCH, _plan(ids), members)
    requests = net.of(AuditRequest)
    assert [r.steps for r in requests] == [list(range(8)), list(range(8, 12))]
    assert all([x.step for x in r.records] == r.steps for r in requests)  # each new record sent once
    last = requests[-1]
    first = next(n for n, _, m in net.sent if m is last)
    ledger.on_result(AuditResult(last.audit_ids[3], 1, first, ids[1].node_id, "s", 11, False, "x", 1, 1, "torch"),
                     members)
    escalation = next(m for m in net.of(AuditRequest) if m.round == 2)
    assert escalation.steps == [11] and escalation.audit_ids == [last.audit_ids[3]]
    assert [x.step for x in escalation.records] == list(range(12))
    # an inconclusive answer (the auditor may have lost its records): the next request carries all again
    req = requests[0]
    ledger.on_result(AuditResult(req.audit_ids[5], 1, first, ids[1].node_id, "s", 5, False, "lost", 0, 0, "torch",
                                 inconclusive=True), members)
    ledger.on_batch(_batches(ids[1], 1, [12], upstream=ids[0]), EPOCH, _plan(ids), members)
    assert [x.step for x in net.of(AuditRequest)[-1].records] == list(range(13))


def test_commitment_chunks_start_with_the_prefill_alone_and_double_up_to_eight():
    """A cheat shows from a session's first steps: those reach the coordinator in small
    chunks; later steps go in chunks of 8 (one signature and one message each)."""
    from types import SimpleNamespace

    ident, net = NodeIdentity.generate(), Net()
    recorder = StageRecorder(ident, net, lambda: "coord", flush_s=60.0, backend="torch", weight_mode="float32")
    recorder.on_loaded(SimpleNamespace(weights_digest=b"w" * 32), StageEntry(1, ident.node_id, 10, 20, "torch"), EPOCH)
    hidden = np.zeros((1, 4), np.float32)
    for step in range(33):
        src = Forward(1, 1, "s", step, 7 + step, "prev", tensor_digest(hidden), hidden=hidden)
        recorder.on_sent(src, hidden, tensor_digest(hidden))
    assert [len(b.records) for b in net.of(CommitBatch)] == [1, 2, 4, 8, 8, 8]
    recorder.on_end("s", EPOCH)  # the answer's end sends what is left
    assert [r.step for r in net.of(CommitBatch)[-1].records] == [31, 32]


def test_outputs_stay_fetchable_for_the_retention_time_within_a_byte_budget():
    """An auditor's later pass may come 20 s after its request (it waits for the answer to
    end): outputs are kept by age, not by count, and the byte budget drops the oldest."""
    from types import SimpleNamespace

    from mesh.verify.messages import AuditFetch

    now = [0.0]
    ident, net = NodeIdentity.generate(), Net()
    out = np.zeros((1, 256), np.float32)  # 1 KiB
    recorder = StageRecorder(ident, net, lambda: "coord", retain_s=60.0, retain_bytes=100 * out.nbytes,
                             clock=lambda: now[0], backend="torch", weight_mode="float32")
    recorder.on_loaded(SimpleNamespace(weights_digest=b"w" * 32), StageEntry(1, ident.node_id, 10, 20, "torch"), EPOCH)

    def commit(session, step):
        src = Forward(1, 1, session, step, step, "prev", tensor_digest(out), hidden=out)
        recorder.on_sent(src, out.copy(), tensor_digest(out))

    for step in range(90):  # 90 steps in 45 s: more than the old 64-output window, all kept
        now[0] = step * 0.5
        commit("a", step)
    assert recorder.fetch(AuditFetch(1, 1, "a", 0, 89, [0, 45, 89])).ok
    now[0] = 70.0  # step 0-19 are now older than 60 s: the next commit drops them
    commit("a", 90)
    assert not recorder.fetch(AuditFetch(1, 1, "a", 0, 19, [19])).ok
    assert recorder.fetch(AuditFetch(1, 1, "a", 0, 20, [20])).ok
    assert recorder.kept_bytes == 71 * out.nbytes and recorder.dropped_young == 0
    for step in range(40):  # another session fills the budget: the oldest outputs go first
        commit("b", step)
    assert recorder.kept_bytes == 100 * out.nbytes and recorder.dropped_young == 11
    assert not recorder.fetch(AuditFetch(1, 1, "a", 0, 30, [30])).ok
    assert recorder.fetch(AuditFetch(1, 1, "a", 0, 31, [31])).ok
    commit("b", 39)  # a replayed step replaces its output, and its bytes
    assert recorder.kept_bytes == 100 * out.nbytes
