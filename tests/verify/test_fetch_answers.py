"""Whose fault an audit that cannot judge is (issue 18: H2, M2). The auditor runs on a
virtual-time loop with the real default model's layers loaded inline; the audited node's
answer to its AuditFetch is the test's. A wrong answer (a flipped bit, a wrong start_pos,
a step nobody asked for) or none before the deadline fails the audit, so it escalates
like any other failure; trouble on the auditor's own side (its load, its memory, the
node unreachable from here) is inconclusive and never counts against the node."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from actors.clock import LOOP_CLOCK, VirtualTimeLoop
from actors.errors import AskTimeout, PeerUnreachable
from actors.identity import NodeIdentity
from kernels.digest import tensor_digest
from kernels.stage import StageSpec, StepInput
from mesh.testing.faults import parse_fault
from mesh.verify.auditor import Auditor
from mesh.verify.commitment import sign_batch
from mesh.verify.messages import AuditData, AuditFetch, AuditRequest, StepRecord
from mesh.verify.worker import InlineAuditCompute

SPEC = StageSpec(10, 20, embed=False, head=False)
SKEY = (SPEC, "torch", "float32")
STEPS = 3
pytestmark = pytest.mark.timeout(120)


def _run(scenario) -> object:
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(scenario())


@pytest.fixture(scope="module")
def honest(model_path):
    """One inline compute with stage [10, 20) loaded, and an honest session of it: a
    prefill of 4 rows then two decode steps, with the records its node signed."""
    compute = InlineAuditCompute()
    digest = _run(lambda: compute.load(model_path, SKEY))
    stage = compute._stages[SKEY]
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal((n, 576))  # SmolLM2-135M's hidden size
              .astype(np.float32) for n in (4, 1, 1)]
    positions, outputs = [0, 4, 5], []
    for x, pos in zip(inputs, positions):
        outputs.append(np.asarray(stage.forward([StepInput("honest", pos, hidden=x)])[0], dtype=np.float32))
    stage.free("honest")
    records = [StepRecord("s1", s, positions[s], len(inputs[s]), tensor_digest(inputs[s]), tensor_digest(outputs[s]))
               for s in range(STEPS)]
    return compute, digest, inputs, positions, outputs, records


def _answer(honest, fetch: AuditFetch) -> AuditData:
    _, _, inputs, positions, outputs, _ = honest
    steps = list(range(fetch.from_step, fetch.step + 1))
    wanted = sorted(set(fetch.outputs_of or [fetch.step]))
    return AuditData(True, "", steps, [positions[s] for s in steps], [len(inputs[s]) for s in steps],
                     np.concatenate([inputs[s] for s in steps]), wanted, [len(outputs[s]) for s in wanted],
                     np.concatenate([outputs[s] for s in wanted]))


def _audit(model_path, honest, answer, compute=None):
    """One first-round audit of the last step; ``answer(fetch)`` is the node's reply (or
    raises). Returns the signed result."""
    inline, digest, *_, records = honest
    producer = NodeIdentity.generate()
    batch = sign_batch(producer, term=1, version=1, stage=1, start=SPEC.start, end=SPEC.end, backend="torch",
                       weight_mode="float32", weights_digest=digest, records=records)
    req = AuditRequest([7], 1, "s1", [STEPS - 1], batch, records, 3)

    async def scenario():
        reports = []

        async def fetch(node, msg):
            return answer(msg)

        auditor = Auditor(NodeIdentity.generate(), model_path, "torch", fetch,
                          lambda coordinator, report: reports.extend(report.results), gather_s=0.1,
                          clock=LOOP_CLOCK, compute=compute or inline)
        try:
            auditor.on_request(req, "coordinator")
            while not reports:
                await asyncio.sleep(0.05)
        finally:
            auditor.close()
        return reports

    (result,) = _run(scenario)
    return result


def test_an_honest_answer_passes(model_path, honest):
    result = _audit(model_path, honest, lambda f: _answer(honest, f))
    assert result.ok and not result.inconclusive, result.reason


@pytest.mark.parametrize("mode", ["flip", "pos", "step"])
def test_h2_a_wrong_answer_to_the_fetch_fails_the_audit(model_path, honest, mode):
    """The refuse-fetch cheater's answers (mesh/testing/faults.py) to an honest fetch."""
    fault = parse_fault(f"refuse-fetch:{mode}")
    result = _audit(model_path, honest, lambda f: fault.refuse(_answer(honest, f), 0))
    assert not result.ok and not result.inconclusive, result


def test_h2_no_answer_before_the_deadline_fails_the_audit(model_path, honest):
    def silent(fetch):
        raise AskTimeout("no reply within 15 s")

    result = _audit(model_path, honest, silent)
    assert not result.ok and not result.inconclusive and "did not answer" in result.reason, result


def test_h2_an_answer_with_missing_or_extra_steps_fails_the_audit(model_path, honest):
    def short(fetch):
        data = _answer(honest, fetch)
        return replace(data, steps=data.steps[1:], start_pos=data.start_pos[1:], lengths=data.lengths[1:],
                       inputs=data.inputs[4:])

    assert not (r := _audit(model_path, honest, short)).ok and not r.inconclusive, r


def test_m2_an_unreachable_node_is_no_judgement(model_path, honest):
    def unreachable(fetch):
        raise PeerUnreachable("no link")

    result = _audit(model_path, honest, unreachable)
    assert not result.ok and result.inconclusive


class _ShortOfMemory(InlineAuditCompute):
    """An auditor whose own memory runs out: loading its copy, or in the pass."""

    def __init__(self, inline, where: str):
        super().__init__()
        self._stages = inline._stages if where == "check" else {}
        self.where = where

    async def load(self, model_path, skey):
        if self.where == "load":
            raise MemoryError("cannot allocate 300 MB")
        return await super().load(model_path, skey)

    async def check(self, *args, **kwargs):
        raise MemoryError("cannot allocate the KV cache")


@pytest.mark.parametrize("where", ["load", "check"])
def test_m2_the_auditors_own_memory_never_counts_against_the_node(model_path, honest, where):
    result = _audit(model_path, honest, lambda f: _answer(honest, f), compute=_ShortOfMemory(honest[0], where))
    assert not result.ok and result.inconclusive and "own trouble" in result.reason, result
