"""Audits on the real model with real kernels stages, in process: honest pipelines
(mixed backends, both weight modes) are never accused; every cheat is caught.

The full-size runs (>= 5,000 audited stage-steps, 20 seeded runs per fault) are in
bench/verify.py; these run the same code paths on fewer tokens.
"""

from __future__ import annotations

import blake3
import pytest

from kernels.sampling import SamplingParams
from mesh.testing.faults import parse_fault
from mesh.testing.verify_harness import Audit, run_pipeline, selected

SAMPLED = SamplingParams(temperature=0.8, seed=7)
GREEDY = SamplingParams()

HONEST = {
    "torch-f32 audited by mlx": ([("torch", "float32")] * 3, "mlx"),
    "mixed f32/quant audited cross-backend": ([("mlx", "float32"), ("torch", "float32"), ("mlx", "quant")], None),
    "torch-quant audited by torch-quant": ([("torch", "quant")] * 3, "mlx"),
}


def _other(backend: str) -> str:
    return "mlx" if backend == "torch" else "torch"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HONEST))
def test_honest_pipelines_pass_every_audit(stages, prompt, name):
    configs, auditor = HONEST[name]
    _tokens, traces = run_pipeline(stages, prompt, configs, max_tokens=8, sampling=SAMPLED)
    audited = 0
    for trace in traces:
        audit = Audit(stages, trace, auditor or _other(trace.backend), SAMPLED)
        steps = sorted(trace.records)
        try:
            # steps 0, 1, then every third, judged two per pass (as the auditor gathers them): each
            # pass re-runs the steps since the last one as one chunk
            picks = [s for s in steps if s < 2 or s % 3 == 1 or s == steps[-1]]
            for group in (picks[i:i + 2] for i in range(0, len(picks), 2)):
                for step, verdict in audit.check_many(group).items():
                    assert verdict.ok, (name, trace.index, step, verdict)
                    audited += 1
        finally:
            audit.close()
    assert audited >= 3 * 4


CHEATS = ["tamper:scale=0.01", "noise:sigma=0.01", "stale", "skip-layer:0", "skip-layer:9"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", CHEATS)
def test_every_cheat_fails_audits_and_is_flagged_within_50_tokens(stages, prompt, spec):
    fault = parse_fault("stage=1:" + spec)
    tokens, traces = run_pipeline(stages, prompt, [("torch", "float32")] * 3, max_tokens=24, sampling=GREEDY,
                                  fault=fault)
    cheater = traces[1]
    first, second = Audit(stages, cheater, "mlx", GREEDY), Audit(stages, cheater, "torch", GREEDY, key="second")
    try:
        verdicts = {step: first.check(step) for step in sorted(cheater.records)}
        failing = [s for s, v in verdicts.items() if not v.ok]
        # every decode step is caught (stale has no earlier step to re-send at the prefill)
        assert set(failing) >= set(range(1, len(tokens))), {s: v.reason for s, v in verdicts.items()}
        assert not second.check(failing[-1]).ok  # the escalation agrees
        # one gathered pass over every step reaches the same verdicts as step by step
        gathered = Audit(stages, cheater, "mlx", GREEDY, key="gathered")
        try:
            assert [s for s, v in gathered.check_many(sorted(cheater.records)).items() if not v.ok] == failing
        finally:
            gathered.close()
    finally:
        first.close()
        second.close()
    # Seeded schedules at rate 0.2: the first selected failing step, plus a commitment chunk (8 steps)
    # before the coordinator sees it, is within the first 50 tokens in >= 19 of 20 runs.
    caught = 0
    for seed in range(20):
        secret = blake3.blake3(f"beacon {seed}".encode()).digest()
        steps = [s for s in failing if selected(secret, cheater.records[s], 0.2)]
        caught += bool(steps) and steps[0] + 8 <= 50
    assert caught >= 19 or len(tokens) < 24


def test_the_healthy_stages_of_a_cheating_pipeline_pass(stages, prompt):
    fault = parse_fault("stage=1:tamper:scale=0.01")
    _, traces = run_pipeline(stages, prompt, [("torch", "float32")] * 3, max_tokens=4, sampling=GREEDY,
                             fault=fault)
    for trace in (traces[0], traces[2]):  # stage 2 computed honestly on what stage 1 sent
        audit = Audit(stages, trace, "mlx", GREEDY)
        try:
            assert all(audit.check(step).ok for step in sorted(trace.records))
        finally:
            audit.close()


def test_a_token_that_the_logits_do_not_sample_fails(stages, prompt):
    import dataclasses

    from kernels.digest import tensor_digest

    _, traces = run_pipeline(stages, prompt, [("torch", "float32")] * 3, max_tokens=3, sampling=SAMPLED)
    head = traces[2]
    rec = head.records[2]
    head.records[2] = dataclasses.replace(rec, token=rec.token + 1)
    assert tensor_digest(head.outputs[2]) == rec.output_digest
    audit = Audit(stages, head, "torch", SAMPLED)
    try:
        assert audit.check(1).ok
        verdict = audit.check(2)
        assert not verdict.ok and "sample" in verdict.reason
    finally:
        audit.close()
