"""When the auditor runs its passes: a session's first pass and escalations at once, later
passes between answers (while this node's stage is idle) but never later than the
deferral bound. The compute is replaced by a recorder of when each pass starts; the
timers are the auditor's own, on a real event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

from actors.identity import NodeIdentity
from mesh.verify.auditor import IDLE_S, Auditor
from mesh.verify.commitment import sign_batch
from mesh.verify.messages import AuditRequest, StepRecord


def _request(producer: NodeIdentity, step: int, round_: int = 1) -> AuditRequest:
    record = StepRecord("s1", step, 40 + step, 1, b"i" * 32, b"o" * 32)
    batch = sign_batch(producer, term=1, version=1, stage=1, start=10, end=20, backend="torch",
                       weight_mode="float32", weights_digest=b"w" * 32, records=[record])
    return AuditRequest([step], round_, "s1", [step], batch, [record], 3)


class _Clock:
    """The stage's activity as the auditor sees it: busy until ``busy_until`` (loop time)."""

    def __init__(self) -> None:
        self.busy_until = 0.0

    def idle_s(self) -> float:
        now = asyncio.get_running_loop().time()
        return 0.0 if now < self.busy_until else now - self.busy_until


async def _schedule(busy_for: float, *, gather_s: float = 0.2, defer_s: float = 1.5) -> tuple[list, float]:
    """Send a first request, then later ones while the stage decodes for ``busy_for`` s;
    returns (loop time and steps of each pass started, the time the later requests began)."""
    loop = asyncio.get_running_loop()
    clock = _Clock()
    auditor = Auditor(NodeIdentity.generate(), Path("unused.gguf"), "torch", fetch=None, report=lambda *a: None,
                      gather_s=gather_s, defer_s=defer_s, stage_idle_s=clock.idle_s)
    passes: list[tuple[float, list[int]]] = []

    async def fake_pass(tkey):
        steps = sorted(s for r, _ in auditor.waiting.pop(tkey, []) for s in r.steps)
        passes.append((loop.time(), steps))
        auditor.tracks[tkey] = object()  # the track exists once its first pass ran

    auditor._pass = fake_pass
    producer = NodeIdentity.generate()
    try:
        clock.busy_until = loop.time() + busy_for
        auditor.on_request(_request(producer, 0), "coordinator")
        await asyncio.sleep(0.4)  # the first pass ran after 0.2 s (min(gather, 0.25))
        later_from = loop.time()
        auditor.on_request(_request(producer, 5), "coordinator")
        await asyncio.sleep(0.1)
        auditor.on_request(_request(producer, 9), "coordinator")
        auditor.on_request(_request(producer, 5, round_=2), "coordinator")  # an escalation: at once
        await asyncio.sleep(min(busy_for + IDLE_S, defer_s) + 0.5)
    finally:
        auditor.close()
    return passes, later_from


def test_first_pass_and_escalation_at_once_later_passes_wait_for_the_answer_to_end():
    passes, later_from = asyncio.run(_schedule(busy_for=1.0))
    assert passes[0][1] == [0] and passes[0][0] < later_from  # the first pass: gathered briefly
    assert passes[1][1] == [5] and passes[1][0] - later_from < 0.2  # the escalation (round 2)
    when, steps = passes[2]
    assert steps == [5, 9]  # the later requests, gathered into one pass
    # held while the stage computed (until 0.6 s after the later requests began), run once it idled
    assert 0.6 + IDLE_S <= when - later_from < 0.6 + IDLE_S + 0.4
    assert len(passes) == 3


def test_a_stage_that_never_idles_still_gets_audited_by_the_deadline():
    passes, later_from = asyncio.run(_schedule(busy_for=30.0, defer_s=1.5))
    when, steps = passes[2]
    assert steps == [5, 9]
    assert 1.5 <= when - later_from < 1.8  # the bound, counted from the pass's first request


def test_an_idle_stage_gives_the_plain_gather():
    passes, later_from = asyncio.run(_schedule(busy_for=0.0, gather_s=0.2))
    when, steps = passes[2]
    assert steps == [5, 9] and when - later_from < 0.4


def test_a_node_past_probation_has_its_sessions_first_pass_wait_for_the_answer_to_end():
    """Two sessions whose first pass came back clean take the node off probation for that
    stage: a new session's first pass then waits like a later one; a failure puts it back."""
    from mesh.verify.auditor import PROBATION_SESSIONS, Verdict

    async def scenario(cleared_sessions: int, then_fail: bool) -> float | None:
        loop = asyncio.get_running_loop()
        clock = _Clock()
        auditor = Auditor(NodeIdentity.generate(), Path("unused.gguf"), "torch", fetch=None,
                          report=lambda *a: None, gather_s=0.2, defer_s=1.5, stage_idle_s=clock.idle_s)
        producer = NodeIdentity.generate()
        started: list[float] = []

        async def fake_pass(tkey):
            auditor.waiting.pop(tkey, None)
            started.append(loop.time())

        auditor._pass = fake_pass
        try:
            req = _request(producer, 0)
            tkey = (req.batch.term, req.batch.version, "s1", req.batch.stage, req.batch.node, 1)
            for k in range(cleared_sessions):  # earlier sessions' clean first passes
                auditor._judged((*tkey[:2], f"old{k}", *tkey[3:]), True, [Verdict(True, "ok")])
            if then_fail:  # a later pass of an old session failed
                auditor._judged((*tkey[:2], "old0", *tkey[3:]), False, [Verdict(False, "outside")])
            clock.busy_until = loop.time() + 30.0  # the node's stage decodes throughout
            t0 = loop.time()
            auditor.on_request(req, "coordinator")
            await asyncio.sleep(0.6)
            return started[0] - t0 if started else None
        finally:
            auditor.close()

    on_probation = asyncio.run(scenario(PROBATION_SESSIONS - 1, then_fail=False))
    assert on_probation is not None and on_probation < 0.4  # at once (0.2 s gathering)
    assert asyncio.run(scenario(PROBATION_SESSIONS, then_fail=False)) is None  # waits for the answer's end
    back_on = asyncio.run(scenario(PROBATION_SESSIONS, then_fail=True))
    assert back_on is not None and back_on < 0.4
