"""In-process pipelines of real kernels stages, for calibration, tests and bench/verify.py.

``run_pipeline`` generates like the mesh does (a prefill step, then one token per step,
the last stage sampling with kernels.sampling) on stages of any backend and weight mode,
optionally with one cheating stage, and keeps every stage's committed records, inputs
and outputs. ``Audit`` replays a stage's trace with ``auditor.check_steps`` — the code
path the auditor role runs — so what is measured here is what the mesh enforces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import blake3
import numpy as np

from kernels.config import load_config
from kernels.digest import tensor_digest
from kernels.sampling import SamplingParams, sample
from kernels.loader import load_stage
from kernels.stage import Stage, StageSpec, StepInput
from mesh.verify.auditor import Verdict, check_steps
from mesh.verify.commitment import leaf_hash
from mesh.testing.faults import Fault
from mesh.verify.messages import AuditData, StepRecord
from mesh.verify.tolerance import audit_backend, audit_weight_mode

GREEDY = SamplingParams()


@dataclass
class StageTrace:
    index: int
    spec: StageSpec
    backend: str
    weight_mode: str
    records: dict[int, StepRecord] = field(default_factory=dict)
    inputs: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)
    outputs: dict[int, np.ndarray] = field(default_factory=dict)


def split(n_layers: int, n_stages: int) -> list[StageSpec]:
    bounds = [round(i * n_layers / n_stages) for i in range(n_stages + 1)]
    return [StageSpec(bounds[i], bounds[i + 1], embed=i == 0, head=i == n_stages - 1) for i in range(n_stages)]


class StageCache:
    """Loaded stages by (spec, backend, mode), shared by every run of a process."""

    def __init__(self, model_path: Path):
        self.model_path = model_path
        self.config = load_config(model_path)
        self._stages: dict[tuple, Stage] = {}

    def get(self, spec: StageSpec, backend: str, mode: str, fault: Fault | None = None) -> Stage:
        key = (spec, backend, mode, fault)
        if key not in self._stages:
            stage = load_stage(self.model_path, spec, backend, mode)
            if fault is not None and fault.kind in ("skip-layer", "noise"):
                fault.corrupt_stage(stage)
            self._stages[key] = stage
        return self._stages[key]


def run_pipeline(cache: StageCache, prompt_ids: list[int], configs: list[tuple[str, str]], *, max_tokens: int,
                 sampling: SamplingParams = GREEDY, fault: Fault | None = None, session: str = "s",
                 eos_ids: tuple[int, ...] = ()) -> tuple[list[int], list[StageTrace]]:
    """Generate ``max_tokens`` through len(configs) stages; ``fault.stage`` cheats."""
    specs = split(cache.config.n_layers, len(configs))
    stages = [cache.get(spec, b, m, fault if fault is not None and fault.applies(i) else None)
              for i, (spec, (b, m)) in enumerate(zip(specs, configs))]
    traces = [StageTrace(i, spec, b, m) for i, (spec, (b, m)) in enumerate(zip(specs, configs))]
    last_honest: dict[int, np.ndarray] = {}
    tokens: list[int] = []
    x: np.ndarray = np.asarray(prompt_ids, dtype=np.int32)
    pos = 0
    try:
        for step in range(max_tokens):
            start = pos
            for i, (stage, trace) in enumerate(zip(stages, traces)):
                kw = {"tokens": x} if stage.spec.embed else {"hidden": x}
                out = stage.forward([StepInput(session, start, **kw)])[0]
                if fault is not None and fault.applies(i) and fault.kind in ("tamper", "stale"):
                    honest, out = out, fault.output(last_honest.get(i), out)
                    last_honest[i] = honest
                out = np.ascontiguousarray(out, dtype=np.float32)
                token = -1
                if stage.spec.head:
                    token = sample(out[-1], sampling, start + x.shape[0])
                trace.inputs[step] = (start, x)
                trace.outputs[step] = out
                trace.records[step] = StepRecord(session, step, start, int(x.shape[0]), tensor_digest(x),
                                                 tensor_digest(out), token)
                x = out
            pos = start + traces[0].records[step].length
            tokens.append(token)
            if token in eos_ids:
                break
            x = np.asarray([token], dtype=np.int32)
    finally:
        for stage in stages:
            stage.free(session)
    return tokens, traces


class Audit:
    """Replays one stage trace like an auditor: one cache, extended step by step."""

    def __init__(self, cache: StageCache, trace: StageTrace, auditor_backend: str, sampling: SamplingParams,
                 key: str = "audit"):
        self.trace = trace
        backend = audit_backend(trace.backend, trace.weight_mode, auditor_backend)
        self.backend = backend
        self.stage = cache.get(trace.spec, backend, audit_weight_mode(trace.backend, trace.weight_mode, backend))
        self.sampling = sampling
        self.key = key
        self.next_step = 0

    def check(self, step: int) -> Verdict:
        return self.check_many([step])[step]

    def check_many(self, audited: list[int]) -> dict[int, Verdict]:
        """Judge ``audited`` (ascending, all past the last check) in one pass, as the auditor does."""
        t = self.trace
        verdicts = check_steps(self.stage, self.key, t.records, self.data(audited), list(audited),
                               producer_backend=t.backend, weight_mode=t.weight_mode, last=t.spec.head)
        self.next_step = audited[-1] + 1
        return verdicts

    def data(self, audited: list[int]) -> AuditData:
        """What the audited stage answers to an AuditFetch for ``audited`` after the last check."""
        t = self.trace
        steps = list(range(self.next_step, audited[-1] + 1))
        outputs = [t.outputs[s].reshape(-1, t.outputs[s].shape[-1]) for s in audited]
        return AuditData(True, "", steps, [t.inputs[s][0] for s in steps], [t.records[s].length for s in steps],
                         np.concatenate([t.inputs[s][1] for s in steps]), list(audited), [len(o) for o in outputs],
                         np.concatenate(outputs), sampling=self.sampling)

    def close(self) -> None:
        self.stage.free(self.key)


def selected(secret: bytes, record: StepRecord, rate: float) -> bool:
    """The ledger's selection rule (BLAKE3 of the beacon secret and the leaf)."""
    u = int.from_bytes(blake3.blake3(secret + leaf_hash(record)).digest(8), "little") / 2.0 ** 64
    return u < rate
