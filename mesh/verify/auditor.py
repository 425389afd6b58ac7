"""The auditor: re-run committed stage steps on the committed inputs and compare.

Attention needs every earlier position, so the auditor keeps a KV cache per audited
(plan, session, stage) and extends it with the inputs it fetches: as one prefill over
the new positions for the float32 class, in the stage's own step shapes (the prefill,
then one position per step) for the bfloat16 class, the only way it reproduces. Each
fetched input is checked against the digest its stage signed.

Audit requests of one session and stage are gathered and checked in one pass: the
stage's weights are read once per pass instead of once per audited step. While the
audited node is on probation for the stage (until the first passes of two of its
sessions came back clean, or again after a failure), a session's first pass gathers
for 0.25 s and runs at normal priority (a cheat shows at once: catch it early); after,
it is scheduled like a later pass. An escalation runs at once. Later passes wait while
this node's own stage is computing, up to ``VerifyConfig.defer_s`` (default 20 s) after
their first request, and otherwise gather for ``VerifyConfig.gather_s`` (default 1 s).
A pass on the core next to a decoding stage slows it (decode is bound by memory
bandwidth, and the pass reads the same layers' weights again:
bench/audit_contention.py), so passes run between answers where they can and at a
bounded delay where they cannot. At 6 s, the passes of a 64-token answer ran during
its last second and cost 5% of its decode speed (docs/verification.md). The stages keep
their outputs for 60 s (recorder.RETAIN_S), so a deferred pass finds them.
Compute runs in a low-priority child process (mesh/verify/worker.py): generation never
waits for it, and it never holds the node's GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from actors.clock import LOOP_CLOCK, Clock
from actors.errors import ActorsError
from actors.identity import NodeIdentity
from kernels.digest import compare, tensor_digest
from kernels.sampling import sample
from kernels.stage import Stage, StageSpec, StepInput
from mesh.verify.commitment import CommitmentRejected, result_bytes, verify_batch
from mesh.verify.messages import (
    AuditData,
    AuditFetch,
    AuditReport,
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
from mesh.verify.worker import AuditProcess

log = structlog.get_logger("mesh.verify.auditor")
# How long requests gather before a later pass (each pass reads the stage's weights once).
GATHER_S = 1.0  # VerifyConfig.gather_s
FIRST_GATHER_S = 0.25  # a session's first pass on a stage: a cheat shows at once, catch it early
# A node is on probation for a stage (in one plan) until its first passes of this many
# sessions came back clean: until then a session's first pass runs at once and at normal
# priority; after, it waits for the answer's end like the later passes (a pass during
# decode costs the stages several percent; see docs/verification.md). A failure puts
# the node back on probation.
PROBATION_SESSIONS = 2
# A later pass waits while this node's stage computed within IDLE_S, at most DEFER_S after
# its first request: that bounds how late a cheat that starts mid-answer is caught.
DEFER_S = 20.0  # VerifyConfig.defer_s
IDLE_S = 0.5


@dataclass
class Verdict:
    ok: bool
    reason: str
    max_row_rel_l2: float = 0.0
    outside_share: float = 0.0
    inconclusive: bool = False  # the audited node was unreachable: no judgement either way
    grid_match: bool | None = None  # would the canonical-grid hash baseline have agreed? (measured only)


def check_steps(stage: Stage, key: str, records: dict[int, StepRecord], data: AuditData, steps: list[int],
                *, producer_backend: str, weight_mode: str, last: bool) -> dict[int, Verdict]:
    """Extend ``stage``'s cache for ``key`` with the fetched steps and judge each of ``steps``.

    Runs on a compute thread. ``records`` are the signed records by step; ``data`` holds
    the inputs of every step from the cache's end to max(steps) and the committed outputs
    of ``steps``. The f32 class re-runs the fetched steps as one chunk (prefill and decode
    agree to ~1e-6 there); the bf16 class replays them in the stage's own step shapes."""

    def every(verdict: Verdict) -> dict[int, Verdict]:
        return {s: verdict for s in steps}

    merge = numeric_class(producer_backend, weight_mode) == "f32"
    wanted = set(steps)
    chunks: list[list[tuple[int, int, np.ndarray]]] = []  # runs of (step, start_pos, input)
    offset, end = 0, stage.cache_len(key)
    for s, pos, n in zip(data.steps, data.start_pos, data.lengths, strict=True):
        x = data.inputs[offset:offset + n]
        offset += n
        rec = records.get(s)
        if rec is None:  # the coordinator's log lacks it (it took office mid-session): no judgement
            return every(Verdict(False, f"no commitment for step {s} in the log", inconclusive=True))
        if tensor_digest(x) != rec.input_digest or rec.start_pos != pos:
            # A session replayed within one plan (a lost message) runs a step number twice;
            # the stage keeps the newer input. No judgement: the outputs decide.
            return every(Verdict(False, f"input of step {s} does not match its commitment", inconclusive=True))
        if pos > end:  # below is a replay from an earlier position: the cache truncates
            return every(Verdict(False, f"inputs are not contiguous at step {s} (position {pos})"))
        if chunks and merge and pos == end:
            chunks[-1].append((s, pos, x))
        else:
            chunks.append([(s, pos, x)])
        end = pos + n
    produced: dict[int, np.ndarray] = {}
    for chunk in chunks:
        rows, at = {}, 0
        for s, _, x in chunk:
            rows[s] = (at, len(x))
            at += len(x)
        x = chunk[0][2] if len(chunk) == 1 else np.concatenate([c[2] for c in chunk])
        mine = [s for s, _, _ in chunk if s in wanted]
        logit_rows = tuple(rows[s][0] + rows[s][1] - 1 for s in mine) or (at - 1,) if last else None
        item = StepInput(key, chunk[0][1], tokens=x if stage.spec.embed else None,
                         hidden=None if stage.spec.embed else x, logit_rows=logit_rows)
        out = stage.forward([item])[0]
        for i, s in enumerate(mine):
            produced[s] = out[i:i + 1] if last else out[rows[s][0]:rows[s][0] + rows[s][1]]
    committed_by_step, at = {}, 0
    for s, n in zip(data.output_steps, data.output_lengths, strict=True):
        committed_by_step[s] = data.outputs[at:at + n]
        at += n
    tolerance = tolerance_for(producer_backend, weight_mode)
    verdicts = {}
    for step in steps:
        rec, committed = records[step], committed_by_step.get(step)
        if committed is None or tensor_digest(committed) != rec.output_digest:
            verdicts[step] = Verdict(False, "the fetched output does not match the committed output digest")
            continue
        if step not in produced:
            verdicts[step] = Verdict(False, f"step {step} was not among the fetched inputs")
            continue
        committed = np.asarray(committed, dtype=np.float32)
        cmp = compare(produced[step], committed, tolerance)
        grid = produced[step].shape == committed.shape and grid_hash(produced[step]) == grid_hash(committed)
        verdict = Verdict(True, "ok", cmp.max_row_rel_l2, cmp.outside_share, grid_match=grid)
        if not cmp.ok:
            verdict = Verdict(False, "output outside tolerance", cmp.max_row_rel_l2, cmp.outside_share,
                              grid_match=grid)
        elif last:
            position = rec.start_pos + rec.length
            if sample(committed[-1], data.sampling, position) != rec.token:
                verdict = Verdict(False, f"token {rec.token} is not what the committed logits sample at {position}",
                                  cmp.max_row_rel_l2, cmp.outside_share, grid_match=grid)
        verdicts[step] = verdict
    return verdicts


class _Track:
    def __init__(self, key: str, skey: tuple, generation: int):
        self.key = key
        self.skey = skey  # the stage copy in the audit process
        self.generation = generation  # which audit process holds its cache
        self.next_step = 0
        self.lock = asyncio.Lock()


class Auditor:
    """Audits asked of this node. ``fetch(node, AuditFetch)`` asks the audited node."""

    def __init__(self, identity: NodeIdentity, model_path: Path, backend: str,
                 fetch: Callable[[str, AuditFetch], asyncio.Future[AuditData]],
                 report: Callable[[str, AuditReport], None], *, max_tracks: int = 16, gather_s: float = GATHER_S,
                 defer_s: float = DEFER_S, stage_idle_s: Callable[[], float] = lambda: float("inf"),
                 clock: Clock = LOOP_CLOCK, compute: Any = None):
        self.identity = identity
        self.model_path = model_path
        self.backend = backend
        self.fetch = fetch
        self.report = report
        self.max_tracks = max_tracks
        self.gather_s = gather_s
        self.defer_s = defer_s
        self.stage_idle_s = stage_idle_s  # seconds since this node's own stage last computed
        self.clock = clock
        # where audit compute runs: a low-priority child process, or (virtual-time meshes) inline
        self.compute = compute if compute is not None else AuditProcess()
        self.stages: dict[tuple, bytes] = {}  # (spec, backend, mode) loaded in the audit process -> weights digest
        self.tracks: OrderedDict[tuple, _Track] = OrderedDict()
        # (term, version, session, stage, node) -> step -> record: the coordinator sends each once
        self.records: OrderedDict[tuple, dict[int, StepRecord]] = OrderedDict()
        self.max_records = 256
        self.waiting: dict[tuple, list[tuple[AuditRequest, str]]] = {}  # track key -> requests not yet run
        self.audits = 0
        self.passes = 0
        self.compute_s = 0.0  # CPU seconds of audit compute in the audit process
        self._timers: dict[tuple, asyncio.TimerHandle] = {}
        self._busy = False
        self._seq = 0
        self._waiting_passes: list[tuple[int, int, asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()
        self._loading = asyncio.Lock()
        self._generation = 0
        self.cleared: dict[tuple, int] = {}  # (term, version, stage, node) -> sessions whose first pass was clean

    def on_request(self, req: AuditRequest, coordinator: str) -> None:
        b = req.batch
        try:
            verify_batch(b)
        except CommitmentRejected as exc:
            verdict = Verdict(False, f"commitment rejected: {exc}")
            self.report(coordinator, AuditReport(self._results(req, {s: verdict for s in req.steps})))
            return
        tkey = (b.term, b.version, req.session, b.stage, b.node, req.round)
        log.debug("audit.requested", node=b.node, stage=b.stage, steps=req.steps, round=req.round)
        self.waiting.setdefault(tkey, []).append((req, coordinator))
        if tkey not in self._timers:  # the first of a gathering; an escalation is checked at once
            if req.round > 1:
                delay, deadline = 0.0, None
            elif tkey not in self.tracks and self._probation(tkey):
                delay, deadline = min(self.gather_s, FIRST_GATHER_S), None
            else:
                delay, deadline = self.gather_s, self.clock.now() + self.defer_s
            self._timers[tkey] = self.clock.call_later(delay, self._start_pass, tkey, deadline)

    @contextlib.asynccontextmanager
    async def _turn(self, priority: int):
        """One pass in the audit process at a time, the most urgent waiting pass next."""
        if self._busy:
            self._seq += 1
            waiter = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting_passes, (priority, self._seq, waiter))
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._next()  # handed the turn as we were cancelled: pass it on
                raise
        self._busy = True
        try:
            yield
        finally:
            self._next()

    def _next(self) -> None:
        while self._waiting_passes:
            waiter = heapq.heappop(self._waiting_passes)[2]
            if not waiter.done():
                waiter.set_result(None)  # the turn moves on; _busy stays set
                return
        self._busy = False

    def warm(self) -> None:
        """Start the audit process now: spawning it and importing torch takes seconds."""
        task = asyncio.get_running_loop().create_task(self._warm(), name="audit-warm")
        self._tasks.add(task)
        task.add_done_callback(self._preloaded)

    async def _warm(self) -> None:
        started = time.perf_counter()
        await self.compute.warm(self.backend, self.model_path)
        log.info("audit.warmed", warm_s=round(time.perf_counter() - started, 3))

    def preload(self, spec: StageSpec, producer_backend: str, weight_mode: str) -> None:
        """Load the copy of a stage this node will audit now, not at its first audit."""
        task = asyncio.get_running_loop().create_task(self._stage(spec, producer_backend, weight_mode),
                                                      name="audit-preload")
        self._tasks.add(task)
        task.add_done_callback(self._preloaded)

    def _preloaded(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("audit.preload_failed", error=str(task.exception()))

    async def _stage(self, spec: StageSpec, producer_backend: str, weight_mode: str) -> tuple[tuple, bytes]:
        """Load (once) the copy of a stage that reproduces the producer's numeric class."""
        backend = audit_backend(producer_backend, weight_mode, self.backend)
        mode = audit_weight_mode(producer_backend, weight_mode, self.backend)
        skey = (spec, backend, mode)
        async with self._loading:
            if skey not in self.stages or self._generation != self.compute.generation:
                if self._generation != self.compute.generation:
                    self.stages.clear()  # a new audit process holds nothing yet
                loading = time.perf_counter()
                self.stages[skey] = await self.compute.load(self.model_path, skey)
                self._generation = self.compute.generation
                log.info("audit.stage_loaded", layers=[spec.start, spec.end], backend=backend, weight_mode=mode,
                         load_s=round(time.perf_counter() - loading, 3))
        return skey, self.stages[skey]

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        self.compute.close()

    def _start_pass(self, tkey: tuple, deadline: float | None = None) -> None:
        now = self.clock.now()
        if deadline is not None and now < deadline and self.stage_idle_s() < IDLE_S:
            # our stage is decoding: wait for a gap (the answer's end) or the deadline
            self._timers[tkey] = self.clock.call_later(min(0.25, deadline - now), self._start_pass, tkey, deadline)
            return
        del self._timers[tkey]
        task = asyncio.get_running_loop().create_task(self._pass(tkey), name="audit")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pass(self, tkey: tuple) -> None:
        requests = self.waiting.pop(tkey, [])
        if not requests:
            return
        first = requests[0][0]
        steps = sorted({s for r, _ in requests for s in r.steps})
        opens_session = tkey not in self.tracks
        try:
            verdicts = await self._check(tkey, first, [r for r, _ in requests], steps)
        except asyncio.CancelledError:
            raise
        except (TimeoutError, ActorsError) as exc:  # unreachable (dead, or we are cut off)
            verdicts = {s: Verdict(False, f"{type(exc).__name__}: {exc}", inconclusive=True) for s in steps}
        except BrokenProcessPool as exc:  # our audit process died: our failure, not the node's
            log.warning("audit.process_died", error=str(exc))
            verdicts = {s: Verdict(False, "the audit process died", inconclusive=True) for s in steps}
        except Exception as exc:  # what the node supplied cannot be run (wrong shapes, ...): it fails
            log.exception("audit.error", node=first.batch.node, session=first.session, steps=steps)
            verdicts = {s: Verdict(False, f"{type(exc).__name__}: {exc}") for s in steps}
        self.passes += 1
        self._judged(tkey, opens_session, verdicts.values())
        reports: dict[str, list[AuditResult]] = {}  # one report per coordinator (one, but for a term change)
        for req, coordinator in requests:
            reports.setdefault(coordinator, []).extend(self._results(req, verdicts))
        for coordinator, results in reports.items():
            self.report(coordinator, AuditReport(results))

    @staticmethod
    def _producer(tkey: tuple) -> tuple:
        """(term, version, stage, node) of a track key: whose record probation keeps."""
        return tkey[:2] + tkey[3:5]

    def _probation(self, tkey: tuple) -> bool:
        """Whether the audited node is still on probation for this stage and plan."""
        return self.cleared.get(self._producer(tkey), 0) < PROBATION_SESSIONS

    def _judged(self, tkey: tuple, opens_session: bool, verdicts) -> None:
        """Count a session's clean first pass towards the node's probation; a failure resets it."""
        pkey = self._producer(tkey)
        verdicts = list(verdicts)
        if any(not v.ok and not v.inconclusive for v in verdicts):
            self.cleared[pkey] = 0
        elif opens_session and tkey[5] == 1 and verdicts and all(v.ok for v in verdicts):
            self.cleared[pkey] = self.cleared.get(pkey, 0) + 1
        while len(self.cleared) > 256:
            self.cleared.pop(next(iter(self.cleared)))

    def _results(self, req: AuditRequest, verdicts: dict[int, Verdict]) -> list[AuditResult]:
        """The signed results of ``req``'s audits."""
        b = req.batch
        backend = audit_backend(b.backend, b.weight_mode, self.backend)
        results = []
        for aid, step in zip(req.audit_ids, req.steps, strict=True):
            verdict = verdicts[step]
            self.audits += 1
            result = AuditResult(aid, req.round, self.identity.node_id, b.node, req.session, step, verdict.ok,
                                 verdict.reason, float(verdict.max_row_rel_l2), float(verdict.outside_share), backend,
                                 verdict.inconclusive)
            result.signature = self.identity.sign(result_bytes(result))
            log.log(20 if verdict.ok else 30, "audit.done", node=b.node, stage=b.stage, session=req.session,
                    step=step, round=req.round, ok=verdict.ok, reason=verdict.reason,
                    rel=round(verdict.max_row_rel_l2, 6))
            results.append(result)
        return results

    async def _check(self, tkey: tuple, req: AuditRequest, requests: list[AuditRequest],
                     steps: list[int]) -> dict[int, Verdict]:
        b = req.batch
        spec = StageSpec(b.start, b.end, embed=b.stage == 0, head=b.stage == req.n_stages - 1)
        skey, digest = await self._stage(spec, b.backend, b.weight_mode)
        if digest != b.weights_digest:
            return {s: Verdict(False, "committed weights digest differs from the model's") for s in steps}
        track = self.tracks.get(tkey)
        if track is None or track.generation != self.compute.generation:
            track = self.tracks[tkey] = _Track(f"audit/{req.round}/{b.term}.{b.version}/{b.stage}/{req.session}",
                                               skey, self.compute.generation)
            while len(self.tracks) > self.max_tracks:
                old = self.tracks.popitem(last=False)[1]
                if old.generation == self.compute.generation:
                    await self.compute.free(old.skey, old.key)
        self.tracks.move_to_end(tkey)
        records = self.records.setdefault(tkey[:5], {})
        self.records.move_to_end(tkey[:5])
        while len(self.records) > self.max_records:
            self.records.popitem(last=False)
        for r in requests:
            records.update({rec.step: rec for rec in r.records})
        async with track.lock:
            if steps[0] < track.next_step:  # an earlier step than the cache holds: start over
                await self.compute.free(track.skey, track.key)
                track.next_step = 0
            log.debug("audit.fetching", node=b.node, stage=b.stage, steps=steps)
            data = await self.fetch(b.node, AuditFetch(b.term, b.version, req.session, track.next_step, steps[-1],
                                                       steps))
            if not data.ok:
                return {s: Verdict(False, f"the audited node could not supply the step: {data.error}") for s in steps}
            # escalations first, then a session's first pass on a stage while its node is on
            # probation (where a cheat shows first), then the rest in order of arrival
            first_pass = track.next_step == 0 and self._probation(tkey)
            priority = 0 if req.round > 1 else 1 if first_pass else 2
            queued = time.perf_counter()
            async with self._turn(priority):
                started = time.perf_counter()
                needed = {s: records[s] for s in data.steps if s in records}
                verdicts, cpu = await self.compute.check(track.skey, track.key, needed, data, steps,
                                                         producer_backend=b.backend, weight_mode=b.weight_mode,
                                                         last=spec.head, urgent=priority < 2)
            self.compute_s += cpu
            log.info("audit.pass", node=b.node, stage=b.stage, steps=steps, round=req.round,
                     waited_ms=round((started - queued) * 1e3, 1), pass_ms=round((time.perf_counter() - started) * 1e3, 1),
                     cpu_ms=round(cpu * 1e3, 1))
            if all(v.ok for v in verdicts.values()):
                track.next_step = steps[-1] + 1
            else:
                track.next_step = 0
                await self.compute.free(track.skey, track.key)
            return verdicts
