"""The auditor: re-run a committed stage step on the committed inputs and compare.

Attention needs every earlier position, so the auditor keeps a KV cache per audited
(plan, session, stage) and extends it step by step with the inputs it fetches — in
the same step shapes the stage used (the prefill, then one position per step), so
even the bfloat16 class reproduces. Each fetched input is checked against the digest
its stage signed. Compute runs on a low-priority audit thread: generation never waits.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from actors.errors import ActorsError
from actors.identity import NodeIdentity
from kernels.digest import compare, tensor_digest
from kernels.runner import ComputeRunner
from kernels.sampling import SamplingParams, sample
from kernels.stage import Stage, StageSpec, StepInput, load_stage
from mesh.verify.commitment import CommitmentRejected, result_bytes, verify_batch
from mesh.verify.messages import (
    AuditData,
    AuditFetch,
    AuditRequest,
    AuditResult,
    StepRecord,
)
from mesh.verify.tolerance import (
    audit_backend,
    audit_weight_mode,
    grid_hash,
    numeric_class,
    tolerance_for,
)

log = structlog.get_logger("mesh.verify.auditor")
AUDIT_NICE = int(os.environ.get("MESH_AUDIT_NICE", "10"))  # CPU share of audits vs stages (0..19)


@dataclass
class Verdict:
    ok: bool
    reason: str
    max_row_rel_l2: float = 0.0
    outside_share: float = 0.0
    inconclusive: bool = False  # the audited node was unreachable: no judgement either way
    grid_match: bool | None = None  # would the canonical-grid hash baseline have agreed? (measured only)


def low_priority_runner() -> ComputeRunner:
    """A second compute thread at nice 19: audits use idle CPU, stages keep theirs."""
    runner = ComputeRunner(name="mesh-audit")

    def lower() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), AUDIT_NICE)
        except (AttributeError, OSError):
            pass

    runner._executor.submit(lower).result()
    return runner


def check_step(stage: Stage, key: str, records: dict[int, StepRecord], data: AuditData, step: int,
               *, producer_backend: str, weight_mode: str, last: bool) -> Verdict:
    """Extend ``stage``'s cache for ``key`` with the fetched steps and judge ``step``.

    Runs on a compute thread. ``records`` are the signed records by step. The f32 class
    re-runs the fetched steps as one chunk (prefill and decode agree to ~1e-6 there);
    the bf16 class replays them in the stage's own step shapes, the only way it reproduces."""
    offset = 0
    chunks = []
    end = stage.cache_len(key)
    for s, pos, n in zip(data.steps, data.start_pos, data.lengths, strict=True):
        x = data.inputs[offset:offset + n]
        offset += n
        rec = records.get(s)
        if rec is None:  # the coordinator's log lacks it (it took office mid-session): no judgement
            return Verdict(False, f"no commitment for step {s} in the log", inconclusive=True)
        if tensor_digest(x) != rec.input_digest or rec.start_pos != pos:
            # A session replayed within one plan (a lost message) runs a step number twice;
            # the stage keeps the newer input. No judgement: the outputs decide.
            return Verdict(False, f"input of step {s} does not match its commitment", inconclusive=True)
        if pos > end:  # below is a replay from an earlier position: the cache truncates
            return Verdict(False, f"inputs are not contiguous at step {s} (position {pos})")
        if chunks and pos == end and numeric_class(producer_backend, weight_mode) == "f32":
            chunks[-1] = (chunks[-1][0], np.concatenate([chunks[-1][1], x]))
        else:
            chunks.append((pos, x))
        end = pos + n
    produced = None
    for pos, x in chunks:
        item = StepInput(key, pos, tokens=x if stage.spec.embed else None, hidden=None if stage.spec.embed else x)
        produced = stage.forward([item])[0]
    if produced is not None and not last:
        produced = produced[-records[step].length:]
    rec = records[step]
    if data.output is None or tensor_digest(data.output) != rec.output_digest:
        return Verdict(False, "the fetched output does not match the committed output digest")
    committed = np.asarray(data.output, dtype=np.float32)
    if last:
        committed = committed.reshape(1, -1)
    cmp = compare(produced, committed, tolerance_for(producer_backend, weight_mode))
    grid = produced.shape == committed.shape and grid_hash(produced) == grid_hash(committed)
    if not cmp.ok:
        return Verdict(False, "output outside tolerance", cmp.max_row_rel_l2, cmp.outside_share, grid_match=grid)
    if last:
        params = SamplingParams(temperature=data.temperature, top_k=data.top_k, top_p=data.top_p, seed=data.seed)
        position = rec.start_pos + rec.length
        if sample(committed[-1], params, position) != rec.token:
            return Verdict(False, f"token {rec.token} is not what the committed logits sample at {position}",
                           cmp.max_row_rel_l2, cmp.outside_share, grid_match=grid)
    return Verdict(True, "ok", cmp.max_row_rel_l2, cmp.outside_share, grid_match=grid)


class _Track:
    def __init__(self, key: str, stage: Stage):
        self.key = key
        self.stage = stage
        self.next_step = 0
        self.records: dict[int, StepRecord] = {}
        self.lock = asyncio.Lock()


class Auditor:
    """Audits asked of this node. ``fetch(node, AuditFetch)`` asks the audited node."""

    def __init__(self, identity: NodeIdentity, model_path: Path, backend: str,
                 fetch: Callable[[str, AuditFetch], asyncio.Future[AuditData]],
                 report: Callable[[str, AuditResult], None], *, max_tracks: int = 16):
        self.identity = identity
        self.model_path = model_path
        self.backend = backend
        self.fetch = fetch
        self.report = report
        self.max_tracks = max_tracks
        self.runner: ComputeRunner | None = None
        self.stages: dict[tuple, Stage] = {}
        self.tracks: OrderedDict[tuple, _Track] = OrderedDict()
        self.audits = 0
        self._tasks: set[asyncio.Task] = set()
        self._loading = asyncio.Lock()

    def on_request(self, req: AuditRequest, coordinator: str) -> None:
        task = asyncio.get_running_loop().create_task(self._audit(req, coordinator), name="audit")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.runner is not None:
            self.runner.close()

    async def _audit(self, req: AuditRequest, coordinator: str) -> None:
        b = req.batch
        try:
            verify_batch(b)
            verdict = await self._check(req)
        except CommitmentRejected as exc:
            verdict = Verdict(False, f"commitment rejected: {exc}")
        except asyncio.CancelledError:
            raise
        except (TimeoutError, ActorsError) as exc:  # unreachable (dead, or we are cut off)
            verdict = Verdict(False, f"{type(exc).__name__}: {exc}", inconclusive=True)
        except Exception as exc:  # what the node supplied cannot be run (wrong shapes, ...): it fails
            log.exception("audit.error", node=b.node, session=req.session, step=req.step)
            verdict = Verdict(False, f"{type(exc).__name__}: {exc}")
        self.audits += 1
        result = AuditResult(req.audit_id, req.round, self.identity.node_id, b.node, req.session, req.step,
                             verdict.ok, verdict.reason, float(verdict.max_row_rel_l2), float(verdict.outside_share),
                             audit_backend(b.backend, b.weight_mode, self.backend), verdict.inconclusive)
        result.signature = self.identity.sign(result_bytes(result))
        log.log(20 if verdict.ok else 30, "audit.done", node=b.node, stage=b.stage, session=req.session,
                step=req.step, round=req.round, ok=verdict.ok, reason=verdict.reason,
                rel=round(verdict.max_row_rel_l2, 6))
        self.report(coordinator, result)

    async def _check(self, req: AuditRequest) -> Verdict:
        b = req.batch
        if self.runner is None:
            self.runner = low_priority_runner()
        backend = audit_backend(b.backend, b.weight_mode, self.backend)
        mode = audit_weight_mode(b.backend, b.weight_mode, self.backend)
        spec = StageSpec(b.start, b.end, embed=b.stage == 0, head=b.stage == req.n_stages - 1)
        skey = (spec, backend, mode)
        async with self._loading:
            if skey not in self.stages:
                self.stages[skey] = await self.runner.run(load_stage, self.model_path, spec, backend, mode)
        stage = self.stages[skey]
        if stage.weights_digest != b.weights_digest:
            return Verdict(False, "committed weights digest differs from the model's")
        tkey = (b.term, b.version, req.session, b.stage, b.node, req.round)
        track = self.tracks.get(tkey)
        if track is None:
            track = self.tracks[tkey] = _Track(f"audit/{req.round}/{b.term}.{b.version}/{b.stage}/{req.session}",
                                                    stage)
            while len(self.tracks) > self.max_tracks:
                old = self.tracks.popitem(last=False)[1]
                await self.runner.run(old.stage.free, old.key)
        self.tracks.move_to_end(tkey)
        async with track.lock:
            track.records.update({r.step: r for r in req.records})
            if req.step < track.next_step:  # an earlier step than the cache holds: start over
                await self.runner.run(track.stage.free, track.key)
                track.next_step = 0
            data = await self.fetch(b.node, AuditFetch(b.term, b.version, req.session, track.next_step, req.step))
            if not data.ok:
                return Verdict(False, f"the audited node could not supply the step: {data.error}")
            verdict = await self.runner.run(check_step, track.stage, track.key, track.records, data, req.step,
                                            producer_backend=b.backend, weight_mode=b.weight_mode,
                                            last=spec.head)
            track.next_step = req.step + 1 if verdict.ok else 0
            if not verdict.ok:
                await self.runner.run(track.stage.free, track.key)
            return verdict
