"""Strikes for everything a cheater controls about its commitments (issue 18: H1, H3),
judged by the coordinator's ledger, driven directly with a virtual clock.

Three stages; every Forward between stages carries its sender's signature on the digest
it sent, and the receiver's record carries that signature. Time only moves when a test
moves it; the ledger judges owed records on every batch and on its timer (``tick``)."""

from __future__ import annotations

from actors import NodeIdentity
from mesh.pipeline.messages import StageEntry
from mesh.pipeline.plan import Epoch
from mesh.verify.commitment import forward_bytes, sign_batch
from mesh.verify.ledger import COMMIT_DEADLINE_S, Ledger
from mesh.verify.messages import StepRecord



class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _d(tag: str, step: int) -> bytes:
    return f"{tag}{step}".encode().ljust(32, b".")


class Pipeline:
    """Three stages of one session; stage k's honest output at step s is _d(f"o{k}", s)."""

    def __init__(self, version: int = 1):
        self.ids = [NodeIdentity.generate() for _ in range(3)]
        self.plan = [StageEntry(i, n.node_id, 10 * i, 10 * i + 10, "torch") for i, n in enumerate(self.ids)]
        self.members = {i.node_id: "torch" for i in self.ids}
        self.clock, self.flags = Clock(), []
        self.ledger = Ledger("c", lambda *a: None, self.flags.append, audit_rate=0.0, clock=self.clock)
        self.ledger.take_office(1)
        self.version = version

    def node(self, stage: int) -> str:
        return self.ids[stage].node_id

    def batch(self, stage: int, steps, *, sent=None, out=None, sign=True, version=None, session="s",
              positions=None, length=1):
        """Stage ``stage``'s signed records of ``steps``: its input is what the stage before
        sent (``sent(s)``, default its honest output), signed by that stage; its output
        ``out(s)`` (default honest). Step s sits at position s (one row), unless ``positions``."""
        up = self.ids[stage - 1] if stage > 0 else None
        sent = sent or (lambda s: _d(f"o{stage - 1}", s) if stage > 0 else _d("tok", s))
        out = out or (lambda s: _d(f"o{stage}", s))
        version = self.version if version is None else version
        pos = positions or (lambda s: s)
        records = []
        for s in steps:
            sig = b""
            if up is not None and sign:
                sig = up.sign(forward_bytes(1, version, session, s, pos(s), up.node_id, sent(s)))
            records.append(StepRecord(session, s, pos(s), length, sent(s), out(s), -1, sig))
        return sign_batch(self.ids[stage], term=1, version=version, stage=stage, start=10 * stage,
                          end=10 * stage + 10, backend="torch", weight_mode="float32", weights_digest=b"w" * 32,
                          records=records, upstream_key=up.public_key if up is not None else b"")

    def send(self, batch) -> None:
        self.ledger.on_batch(batch, Epoch(1, self.version), self.plan, self.members)

    def wait(self, seconds: float) -> None:
        """Time passes with the coordinator awake (its timer ticks every half second)."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now = min(end, self.clock.now + 0.5)
            self.send(self.batch(0, []))  # an empty batch: a tick

    def flagged(self) -> list[str]:
        return [f.node for f in self.flags]


def test_h1_a_stage_that_signs_one_digest_and_sends_another_is_flagged_not_its_receiver():
    """Stage 1 sends garbage downstream (signed as sent, so stage 2 takes it) and commits
    the honest output's digest: stage 2's records hold stage 1's signature on what it
    really sent, and the two signatures of stage 1 contradict each other."""
    p = Pipeline()
    p.send(p.batch(0, range(4)))
    p.send(p.batch(1, range(4)))  # commits its honest outputs o1
    p.send(p.batch(2, range(4), sent=lambda s: _d("garbage", s)))  # but sent garbage, signed
    p.wait(COMMIT_DEADLINE_S + 1)
    assert p.flagged() == [p.node(1)]
    (flag,) = p.flags
    assert "broken-link" in flag.reason
    strike = flag.evidence["strikes"][0]
    assert strike["batch"]["node"] == p.node(2) and strike["committed_by"]["node"] == p.node(1)
    assert p.ledger.broken_links >= 2


def test_h1_a_receiver_that_commits_an_input_nobody_signed_is_flagged_not_its_sender():
    p = Pipeline()
    p.send(p.batch(0, range(4)))
    p.send(p.batch(1, range(4), sign=False))  # claims inputs without the sender's signatures
    p.send(p.batch(2, range(4)))
    p.wait(COMMIT_DEADLINE_S + 1)
    assert p.flagged() == [p.node(1)]
    assert "unsigned-input" in p.flags[0].reason


def test_h1_a_receiver_that_forges_its_input_digest_cannot_frame_the_sender():
    """Stage 2 claims it received other bytes than stage 1 sent, reusing stage 1's
    signatures on the honest digest: the signature does not cover its claim."""
    p = Pipeline()
    p.send(p.batch(0, range(4)))
    p.send(p.batch(1, range(4)))
    forged = p.batch(2, range(4))
    for r in forged.records:
        r.input_digest = _d("framed", r.step)
    forged = sign_batch(p.ids[2], term=1, version=1, stage=2, start=20, end=30, backend="torch",
                        weight_mode="float32", weights_digest=b"w" * 32, records=forged.records,
                        upstream_key=p.ids[1].public_key)
    p.send(forged)
    p.wait(COMMIT_DEADLINE_S + 1)
    assert p.flagged() == [p.node(2)]


def test_h3_a_stage_that_never_sends_its_commitments_is_flagged():
    p = Pipeline()
    p.send(p.batch(0, range(6)))
    # stage 1 withholds every batch; stage 2's signed inputs show it computed and sent them
    p.send(p.batch(2, range(6)))
    p.wait(COMMIT_DEADLINE_S + 1)
    assert p.flagged() == [p.node(1)]
    assert "missing-commitment" in p.flags[0].reason and p.ledger.missing >= 2


def test_h3_ring_steps_nobody_signed_are_counted_and_cannot_frame_the_last_stage():
    """Stage 0's records say tokens came back round the ring, but the token path is not
    signed yet: a rogue head could make up a session whose ring steps the last stage never
    computed. Such a debt is counted, never a strike (review of the first design: the
    tail was flagged after 10 s)."""
    p = Pipeline()
    p.send(p.batch(0, range(6), session="made-up"))  # steps 1..5 at stage 0 claim tokens from the tail
    p.wait(COMMIT_DEADLINE_S + 1)
    assert not p.flags and p.ledger.missing >= 2
    assert not p.ledger.chain_strikes.get(p.node(2))


def test_h3_an_honest_stage_that_is_late_within_the_deadline_is_not_flagged():
    """A loaded stage: its batches reach the coordinator 9 s after the evidence."""
    p = Pipeline()
    p.send(p.batch(0, range(6)))
    p.send(p.batch(2, range(6)))
    p.wait(COMMIT_DEADLINE_S - 1)
    p.send(p.batch(1, range(6)))
    p.wait(3 * COMMIT_DEADLINE_S)
    assert not p.flags and p.ledger.missing == 0 and p.ledger.verified_links > 0


def test_h3_a_stall_of_the_coordinator_itself_moves_the_deadlines_back():
    """The coordinator's loop stalled 30 s: the owed batch may be next in its mailbox."""
    p = Pipeline()
    p.send(p.batch(0, range(6)))
    p.send(p.batch(2, range(6)))
    p.clock.now += 30.0
    p.ledger.tick()  # the first tick after the stall judges nothing
    p.send(p.batch(1, range(6)))
    p.wait(3 * COMMIT_DEADLINE_S)
    assert not p.flags


def test_h3_late_past_the_deadline_is_a_strike():
    p = Pipeline()
    p.send(p.batch(0, range(6)))
    p.send(p.batch(2, range(6)))
    p.wait(COMMIT_DEADLINE_S + 1)
    p.send(p.batch(1, range(6)))  # too late: already charged
    assert p.flagged() == [p.node(1)]


def test_h3_commitments_without_the_prefill_are_a_strike():
    """The prefill's record left out of two sessions: the next stage's signed inputs show
    it was sent, so each is a missing commitment at the deadline."""
    p = Pipeline()
    for session in ("s", "t"):
        p.send(p.batch(0, range(6), session=session))
        p.send(p.batch(2, range(6), session=session))
        p.send(p.batch(1, range(1, 6), session=session))  # step 0 (the prefill) left out
    assert not p.flags  # never early: a batch re-sent after a failed send may still come
    p.wait(COMMIT_DEADLINE_S + 1)
    assert p.flagged() == [p.node(1)]
    assert {s["kind"] for s in p.flags[0].evidence["strikes"]} == {"missing-commitment"}
    assert p.ledger.structure_anomalies >= 2  # its records start after the prefill: counted


def test_h3_a_gap_is_counted_not_struck_for_positions_come_from_the_input():
    """A stage does not choose its positions: the serving node's (or the stage before's
    signed) Forward does. A rogue upstream that jumps positions must not get the honest
    stages after it flagged (review: 2 jumps flagged every later stage)."""
    p = Pipeline()
    p.send(p.batch(0, range(6), positions=lambda s: s if s < 3 else s + 5))  # positions jump at step 3
    p.send(p.batch(1, range(6), positions=lambda s: s if s < 3 else s + 5))
    p.send(p.batch(2, range(6), positions=lambda s: s if s < 3 else s + 5))
    for stage in range(3):  # and again at step 6
        p.send(p.batch(stage, range(6, 9), positions=lambda s: s + 9))
    p.wait(COMMIT_DEADLINE_S + 1)
    assert not p.flags and p.ledger.structure_anomalies >= 6


def test_h3_steps_signed_under_a_stale_plan_version_stay_owed():
    p = Pipeline(version=2)
    p.send(p.batch(0, range(6)))
    p.send(p.batch(2, range(6)))
    stale = p.batch(1, range(6), version=1)  # ignored: nobody audits a plan that is gone
    p.send(stale)
    assert p.ledger.stale == 1
    p.wait(COMMIT_DEADLINE_S + 1)
    assert p.flagged() == [p.node(1)]


def test_h3_a_malformed_batch_is_its_senders_strike():
    p = Pipeline()
    bad = p.batch(1, range(2))
    bad.signature = bytes(64)
    p.send(bad)
    bad2 = p.batch(1, range(2, 4))
    bad2.records[0].output_digest = b"x" * 32  # no longer the signed root
    p.send(bad2)
    assert p.flagged() == [p.node(1)] and p.ledger.rejected == 2


def test_honest_pipeline_with_a_replayed_step_flags_nobody():
    """A lost step is replayed within the plan: the latest step runs again from position 0
    over every token so far, and its outputs differ from the first run's. The receiver's
    signed input (of either run) matches one of the sender's committed outputs."""
    p = Pipeline()
    p.send(p.batch(0, range(4)))
    p.send(p.batch(1, range(4)))
    p.send(p.batch(2, range(4)))
    replay = dict(positions=lambda s: 0, length=4)
    again = lambda s: _d("o1-replayed", s)  # noqa: E731
    p.send(p.batch(0, [3], out=lambda s: _d("o0-replayed", s), **replay))
    p.send(p.batch(2, [3], sent=again, **replay))  # the receiver's record of the replay first
    p.send(p.batch(1, [3], sent=lambda s: _d("o0-replayed", s), out=again, **replay))
    p.send(p.batch(0, range(4, 8)))
    p.send(p.batch(1, range(4, 8)))
    p.send(p.batch(2, range(4, 8)))
    p.wait(3 * COMMIT_DEADLINE_S)
    assert not p.flags and p.ledger.missing == 0 and p.ledger.broken_links == 0
    assert not any(p.ledger.chain_strikes.values())


def test_an_honest_stage_whose_batch_of_the_old_plan_arrives_after_a_replan_is_not_flagged():
    """The plan moved on (version 2) while stage 1's last chunk of version 1 was on its
    way: that batch is no longer audited, but it still pays what version 1's records owe."""
    p = Pipeline()
    p.send(p.batch(0, range(6)))
    p.send(p.batch(2, range(6)))
    p.version = 2  # the coordinator's plan is version 2 now
    p.send(p.batch(1, range(6), version=1))  # stage 1's chunk of version 1, late
    assert p.ledger.stale == 0 and p.ledger.verified_links >= 6
    p.wait(3 * COMMIT_DEADLINE_S)
    assert not p.flags and p.ledger.missing == 0


def test_an_honest_stage_whose_batches_arrive_out_of_order_is_not_flagged():
    """A batch whose send failed is re-sent after a later one went out (review: judged
    early on "a later record is in", the honest stage was flagged)."""
    p = Pipeline()
    p.send(p.batch(0, range(6)))
    p.send(p.batch(2, range(6)))
    p.send(p.batch(1, range(3, 6)))
    p.wait(2.0)
    p.send(p.batch(1, range(3)))
    p.wait(COMMIT_DEADLINE_S + 1)
    assert not p.flags and p.ledger.missing == 0
