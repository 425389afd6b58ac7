"""The stage side of the chain's signatures and of the commitment deadline, driven
directly: every Forward a stage sends is signed on its digest and the next stage takes
only a Forward whose signature checks; chunks go out on a timer; the lie-digest and
withhold cheaters do what their names say (mesh/testing/faults.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from actors import NodeIdentity
from kernels.digest import tensor_digest
from mesh.pipeline.messages import Forward, Retransmit, StageEntry
from mesh.pipeline.plan import Epoch
from mesh.pipeline.stage_host import StageHost
from mesh.testing.faults import parse_fault
from mesh.verify.commitment import forward_signed
from mesh.verify.messages import CommitBatch, WireFault
from mesh.verify.recorder import StageRecorder

EPOCH = Epoch(1, 1)


class Net:
    def __init__(self):
        self.sent: list[tuple[str, str, object]] = []

    def __call__(self, node, actor, msg):
        self.sent.append((node, actor, msg))

    def of(self, kind):
        return [m for _, _, m in self.sent if isinstance(m, kind)]


def _recorder(fault: str | None = None, now=None, flush_s: float = 1.0):
    ident, net = NodeIdentity.generate(), Net()
    clock = now or [0.0]
    recorder = StageRecorder(ident, net, lambda: "coord", backend="torch", weight_mode="float32", flush_s=flush_s,
                             fault=parse_fault(fault) if fault else None, clock=lambda: clock[0])
    recorder.on_loaded(SimpleNamespace(weights_digest=b"w" * 32), StageEntry(1, ident.node_id, 10, 20, "torch"), EPOCH)
    return ident, net, recorder, clock


def _fwd(ident, step: int, hidden: np.ndarray) -> Forward:
    return Forward(1, 1, "s", step, step, ident.node_id, tensor_digest(hidden), hidden=hidden)


def test_a_sealed_forward_is_signed_on_its_digest_and_a_forged_one_is_refused():
    ident, net, recorder, _ = _recorder()
    hidden = np.ones((1, 8), np.float32)
    sealed = recorder.seal(_fwd(ident, 0, hidden))
    assert recorder.accepts(sealed)
    assert forward_signed(sealed.public_key, sealed.signature, 1, 1, "s", 0, 0, ident.node_id, sealed.digest)
    # the next stage's host refuses a Forward whose signature does not cover its digest
    receiver, rnet = NodeIdentity.generate(), Net()
    rrec = StageRecorder(receiver, rnet, lambda: "coord", backend="torch", weight_mode="float32")
    host = StageHost(receiver.node_id, None, backend="torch", weight_mode="float32", runner=None, send=rnet,
                     observer=rrec)
    host.epoch, host.entry = EPOCH, StageEntry(2, receiver.node_id, 20, 30, "torch")
    other = hidden * 2
    forged = Forward(**{**sealed.__dict__, "hidden": other, "digest": tensor_digest(other)})  # same signature
    host.on_forward(forged)
    assert host.queue.empty() and rnet.of(Retransmit) and rnet.of(WireFault)
    unsigned = _fwd(ident, 1, hidden)
    host.on_forward(unsigned)
    assert host.queue.empty() and len(rnet.of(Retransmit)) == 2


def test_lie_digest_sends_other_bytes_signed_as_sent_and_commits_the_honest_digest():
    ident, net, recorder, _ = _recorder("lie-digest", flush_s=60.0)
    hidden = np.ones((1, 8), np.float32)
    src = _fwd(NodeIdentity.generate(), 0, hidden)
    sent = recorder.seal(_fwd(ident, 0, hidden))
    assert not np.array_equal(sent.hidden, hidden) and sent.digest == tensor_digest(sent.hidden)
    assert recorder.accepts(sent)  # the next stage takes it
    recorder.on_sent(src, hidden, tensor_digest(hidden))
    (batch,) = net.of(CommitBatch)
    assert batch.records[0].output_digest == tensor_digest(hidden) != sent.digest


def test_a_chunk_goes_out_on_the_timer_when_the_next_step_is_slow():
    ident, net, recorder, clock = _recorder(flush_s=1.0)
    hidden = np.ones((1, 8), np.float32)
    for step in range(2):  # the prefill goes alone; step 1 waits for a second record
        recorder.on_sent(_fwd(NodeIdentity.generate(), step, hidden), hidden, tensor_digest(hidden))
    assert [len(b.records) for b in net.of(CommitBatch)] == [1]
    clock[0] = 0.5
    recorder.flush_due()
    assert len(net.of(CommitBatch)) == 1
    clock[0] = 1.0
    recorder.flush_due()
    assert [len(b.records) for b in net.of(CommitBatch)] == [1, 1]


def test_withhold_never_sends_and_withhold_late_sends_late():
    hidden = np.ones((1, 8), np.float32)
    _, net, recorder, clock = _recorder("withhold")
    for step in range(4):
        recorder.on_sent(_fwd(NodeIdentity.generate(), step, hidden), hidden, tensor_digest(hidden))
    clock[0] = 100.0
    recorder.flush_due()
    assert not net.of(CommitBatch) and recorder.batches > 0
    _, net, recorder, clock = _recorder("withhold:late=30")
    recorder.on_sent(_fwd(NodeIdentity.generate(), 0, hidden), hidden, tensor_digest(hidden))
    clock[0] = 29.0
    recorder.flush_due()
    assert not net.of(CommitBatch)
    clock[0] = 30.0
    recorder.flush_due()
    assert len(net.of(CommitBatch)) == 1


def test_the_new_fault_specs_parse_and_bad_ones_are_refused():
    import pytest

    from mesh.testing.faults import BadFaultSpec

    assert parse_fault("stage=1:lie-digest").kind == "lie-digest"
    assert parse_fault("stage=2:refuse-fetch").mode == ""
    assert parse_fault("refuse-fetch:silent").mode == "silent"
    assert parse_fault("stage=1:withhold").value == 0.0
    assert parse_fault("withhold:late=12.5").value == 12.5
    for bad in ("refuse-fetch:loud", "withhold:soon=3", "lie-digest:3"):
        with pytest.raises(BadFaultSpec):
            parse_fault(bad)


def test_a_batch_signed_while_no_coordinator_is_known_is_sent_once_one_is():
    """An honest stage's records must reach the judge even when they are signed during an
    election (or while the coordinator's link is down): lost, the next stage's signed
    evidence of what it received would stand unanswered, missing commitments against it."""
    ident, net = NodeIdentity.generate(), Net()
    coordinator = [None]
    clock = [0.0]
    recorder = StageRecorder(ident, net, lambda: coordinator[0], backend="torch", weight_mode="float32",
                             flush_s=1.0, clock=lambda: clock[0])
    recorder.on_loaded(SimpleNamespace(weights_digest=b"w" * 32), StageEntry(1, ident.node_id, 10, 20, "torch"), EPOCH)
    hidden = np.ones((1, 8), np.float32)
    for step in range(3):
        recorder.on_sent(_fwd(NodeIdentity.generate(), step, hidden), hidden, tensor_digest(hidden))
    clock[0] = 2.0
    recorder.flush_due()
    assert not net.of(CommitBatch)
    coordinator[0] = "coord"
    clock[0] = 2.5
    recorder.flush_due()
    sent = net.of(CommitBatch)
    assert sorted(r.step for b in sent for r in b.records) == [0, 1, 2]
    assert all(node == "coord" for node, _, m in net.sent if isinstance(m, CommitBatch))


def test_batches_kept_back_go_out_before_any_later_one():
    ident, net = NodeIdentity.generate(), Net()
    coordinator = [None]
    recorder = StageRecorder(ident, net, lambda: coordinator[0], backend="torch", weight_mode="float32",
                             chunk=1, clock=lambda: 0.0)
    recorder.on_loaded(SimpleNamespace(weights_digest=b"w" * 32), StageEntry(1, ident.node_id, 10, 20, "torch"), EPOCH)
    hidden = np.ones((1, 8), np.float32)
    recorder.on_sent(_fwd(NodeIdentity.generate(), 0, hidden), hidden, tensor_digest(hidden))
    coordinator[0] = "coord"
    recorder.on_sent(_fwd(NodeIdentity.generate(), 1, hidden), hidden, tensor_digest(hidden))
    assert [r.step for b in net.of(CommitBatch) for r in b.records] == [0, 1]
