"""The auditor carries its schedule out on the clock it is given: on a virtual-time loop,
with the real default model loaded inline, a pass starts (it asks the audited node for
its steps) exactly when `AuditSchedule` says, and the audit process is handed on in the
order `Turns` says, also when a waiting pass is cancelled."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from actors.clock import LOOP_CLOCK, VirtualTimeLoop
from actors.identity import NodeIdentity
from kernels.stage import StageSpec
from mesh.verify.auditor import Auditor
from mesh.verify.commitment import sign_batch
from mesh.verify.messages import AuditData, AuditFetch, AuditRequest, StepRecord
from mesh.verify.schedule import Turn
from mesh.verify.worker import InlineAuditCompute

SPEC = StageSpec(10, 20, embed=False, head=False)
pytestmark = pytest.mark.timeout(60)  # a lost turn deadlocks the loop: fail fast


def _request(producer: NodeIdentity, step: int, digest: bytes, round_: int = 1) -> AuditRequest:
    record = StepRecord("s1", step, 40 + step, 1, b"i" * 32, b"o" * 32)
    batch = sign_batch(producer, term=1, version=1, stage=1, start=SPEC.start, end=SPEC.end, backend="torch",
                       weight_mode="float32", weights_digest=digest, records=[record])
    return AuditRequest([step], round_, "s1", [step], batch, [record], 3)


def _run(scenario) -> object:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(scenario())


@pytest.fixture(scope="module")
def compute(model_path):
    """One inline audit compute for the module: the stage copy loads once."""
    compute = InlineAuditCompute()
    digest = _run(lambda: compute.load(model_path, (SPEC, "torch", "float32")))
    return compute, digest


def test_passes_start_when_the_schedule_says_on_the_clock_the_auditor_is_given(model_path, compute):
    inline, digest = compute

    async def scenario():
        loop = asyncio.get_running_loop()
        busy_until = loop.time() + 1.0  # this node's stage decodes for the first second

        def idle_s() -> float:
            return 0.0 if loop.time() < busy_until else loop.time() - busy_until

        fetched: list[tuple[float, list[int]]] = []
        reports: list[tuple[float, list]] = []

        async def fetch(node: str, req: AuditFetch) -> AuditData:
            fetched.append((loop.time(), req.outputs_of))
            return AuditData(False, error="gone")  # the pass ends here: no judgement of the numbers

        auditor = Auditor(NodeIdentity.generate(), model_path, "torch", fetch,
                          lambda coordinator, report: reports.append((loop.time(), report.results)),
                          gather_s=0.2, defer_s=1.5, stage_idle_s=idle_s, clock=LOOP_CLOCK, compute=inline)
        producer = NodeIdentity.generate()
        t0 = loop.time()
        try:
            auditor.on_request(_request(producer, 0, digest), "coordinator")
            await asyncio.sleep(0.4)
            auditor.on_request(_request(producer, 5, digest), "coordinator")
            await asyncio.sleep(0.1)
            auditor.on_request(_request(producer, 9, digest), "coordinator")
            auditor.on_request(_request(producer, 5, digest, round_=2), "coordinator")
            await asyncio.sleep(3.0)
        finally:
            auditor.close()
        return [(round(at - t0, 6), steps) for at, steps in fetched], reports, auditor

    fetched, reports, auditor = _run(scenario)
    # the first pass after min(gather, 0.25 s); the escalation at once; the later pass held
    # while the stage decoded (to 1.0 s), run at the first look after it idled 0.5 s
    assert fetched == [(0.2, [0]), (0.5, [5]), (1.6, [5, 9])]
    assert [len(results) for _, results in reports] == [1, 1, 2] and auditor.passes == 3
    assert all(not r.ok and "could not supply" in r.reason for _, results in reports for r in results)
    assert not auditor.schedule.gathering and not auditor._timers


def test_the_audit_process_goes_to_the_most_urgent_waiting_pass_and_past_a_cancelled_one():
    async def scenario():
        auditor = Auditor(NodeIdentity.generate(), Path("unused.gguf"), "torch", None, lambda *a: None,
                          clock=LOOP_CLOCK, compute=InlineAuditCompute())
        order: list[str] = []
        release = asyncio.Event()

        async def pass_(name: str, turn: Turn, hold: asyncio.Event | None = None) -> None:
            async with auditor._turn(turn):
                order.append(name)
                if hold is not None:
                    await hold.wait()

        first = asyncio.create_task(pass_("running", Turn.LATER, release))
        await asyncio.sleep(0)
        tasks = {name: asyncio.create_task(pass_(name, turn)) for name, turn in
                 [("later", Turn.LATER), ("cancelled", Turn.ESCALATION), ("first-pass", Turn.PROBATION_FIRST_PASS),
                  ("escalation", Turn.ESCALATION)]}
        await asyncio.sleep(0)
        tasks["cancelled"].cancel()
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, *tasks.values(), return_exceptions=True)
        # handed the turn and cancelled before it woke: the turn moves on
        release2 = asyncio.Event()
        holder = asyncio.create_task(pass_("holder", Turn.LATER, release2))
        await asyncio.sleep(0)
        handed = asyncio.create_task(pass_("handed", Turn.ESCALATION))
        after = asyncio.create_task(pass_("after", Turn.LATER))
        await asyncio.sleep(0)
        release2.set()
        await asyncio.sleep(0)  # the holder ends and hands the turn to "handed" ...
        handed.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(holder, handed, after, return_exceptions=True)
        auditor.close()
        return order, handed.cancelled(), auditor._turns.holder

    order, handed_cancelled, holder = _run(scenario)
    assert order == ["running", "escalation", "first-pass", "later", "holder", "after"]
    assert handed_cancelled and holder is None
