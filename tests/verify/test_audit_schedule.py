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
