"""The auditor: re-run committed stage steps on the committed inputs and compare.

Attention needs every earlier position, so the auditor keeps a KV cache per audited
(plan, session, stage) and extends it with the inputs it fetches: as one prefill over
the new positions for the float32 class, in the stage's own step shapes (the prefill,
then one position per step) for the bfloat16 class, the only way it reproduces. Each
fetched input is checked against the digest its stage signed.

Audit requests of one session and stage are gathered and checked in one pass: the
stage's weights are read once per pass instead of once per audited step. When a pass
starts, and which waiting pass runs next, is decided by the pure `AuditSchedule` and
`Turns` (mesh/verify/schedule.py: escalations at once, a session's first pass soon while
its node is on probation, later passes between answers but at most
``VerifyConfig.defer_s`` after their first request); the `Auditor` feeds them requests
and timer firings read from its injected clock and carries out what they answer. A pass
on the core next to a decoding stage slows it (decode is bound by memory bandwidth, and
the pass reads the same layers' weights again: bench/audit_contention.py), so passes
run between answers where they can and at a bounded delay where they cannot
(docs/verification.md). The stages keep their outputs for 60 s (recorder.RETAIN_S), so
a deferred pass finds them.
Compute runs in a low-priority child process (mesh/verify/worker.py): generation never
waits for it, and it never holds the node's GIL.

Whose fault a pass that cannot judge is:
- the audited node's (a failed audit, escalated like any other): an answer to the fetch
  that is not the committed data — an input that does not hash to its signed digest, a
  wrong start_pos or length, a step it was not asked for or did not commit, shapes that
  do not add up, "not retained" — or no answer within FETCH_TIMEOUT_S;
- this auditor's (inconclusive, never counted against the node): loading its copy of the
  stage, its audit process dying, running out of memory, records it lost, the audited
  node unreachable from here (liveness is the failure detector's to judge).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
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
from actors.errors import ActorDead, ActorsError, AskTimeout, PeerUnreachable
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
from mesh.verify.schedule import (
    DEFER_S,
    GATHER_S,
    AuditSchedule,
    CheckAt,
    Outcome,
    StartPass,
    TrackKey,
    Turn,
    Turns,
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
FETCH_TIMEOUT_S = 15.0  # an audited node that has not answered a fetch by then fails the audit
__all__ = ["DEFER_S", "GATHER_S", "Auditor", "Verdict", "check_steps"]


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
        if tensor_digest(x) != rec.input_digest or rec.start_pos != pos or rec.length != n:
            # the node supplied another input than the one it signed (a replayed step's newer
            # record reaches this auditor before it asks: the ledger re-sends records it replaced)
            return every(Verdict(False, f"input of step {s} does not match its commitment"))
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
        self.schedule = AuditSchedule(gather_s=gather_s, defer_s=defer_s)
        self.stage_idle_s = stage_idle_s  # seconds since this node's own stage last computed
        self.clock = clock
        # where audit compute runs: a low-priority child process, or (virtual-time meshes) inline
        self.compute = compute if compute is not None else AuditProcess()
        self.stages: dict[tuple, bytes] = {}  # (spec, backend, mode) loaded in the audit process -> weights digest
        self.tracks: OrderedDict[tuple, _Track] = OrderedDict()
        # (term, version, session, stage, node) -> step -> record: the coordinator sends each once
        self.records: OrderedDict[tuple, dict[int, StepRecord]] = OrderedDict()
        self.max_records = 256
        self.waiting: dict[TrackKey, list[tuple[AuditRequest, str]]] = {}  # requests not yet run
        self.audits = 0
        self.passes = 0
        self.compute_s = 0.0  # CPU seconds of audit compute in the audit process
        self._timers: dict[TrackKey, asyncio.TimerHandle] = {}
        self._turns = Turns()
        self._tickets = itertools.count(1)
        self._turn_waiters: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._loading = asyncio.Lock()
        self._generation = 0

    def on_request(self, req: AuditRequest, coordinator: str) -> None:
        b = req.batch
        try:
            verify_batch(b)
        except CommitmentRejected as exc:
            verdict = Verdict(False, f"commitment rejected: {exc}")
            self.report(coordinator, AuditReport(self._results(req, {s: verdict for s in req.steps})))
            return
        tkey = TrackKey(b.term, b.version, req.session, b.stage, b.node, req.round)
        log.debug("audit.requested", node=b.node, stage=b.stage, steps=req.steps, round=req.round)
        self.waiting.setdefault(tkey, []).append((req, coordinator))
        self._carry_out(self.schedule.request(tkey, self.clock.now(), track_open=tkey in self.tracks))

    def _wake(self, tkey: TrackKey) -> None:
        self._timers.pop(tkey, None)
        self._carry_out(self.schedule.wake(tkey, self.clock.now(), self.stage_idle_s()))

    def _carry_out(self, action: CheckAt | StartPass | None) -> None:
        if isinstance(action, CheckAt):
            self._timers[action.key] = self.clock.call_later(action.at - self.clock.now(), self._wake, action.key)
        elif isinstance(action, StartPass):
            task = asyncio.get_running_loop().create_task(self._pass(action.key), name="audit")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @contextlib.asynccontextmanager
    async def _turn(self, turn: Turn):
        """One pass in the audit process at a time, the most urgent waiting pass next (`Turns`)."""
        ticket = next(self._tickets)
        if not self._turns.ask(ticket, turn):
            waiter = self._turn_waiters[ticket] = asyncio.get_running_loop().create_future()
            try:
                await waiter
            except asyncio.CancelledError:
                self._hand_on(self._turns.withdraw(ticket))  # if it was handed the turn, pass it on
                raise
            finally:
                self._turn_waiters.pop(ticket, None)
        try:
            yield
        finally:
            self._hand_on(self._turns.release())

    def _hand_on(self, ticket: int | None) -> None:
        waiter = self._turn_waiters.get(ticket)
        # a waiter cancelled while it was handed the turn withdraws as it wakes, and passes it on
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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

    async def _pass(self, tkey: TrackKey) -> None:
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
        except _OwnTrouble as exc:  # our side (load, memory): never the audited node's failure
            log.warning("audit.own_trouble", node=first.batch.node, error=str(exc))
            verdicts = {s: Verdict(False, f"auditor's own trouble: {exc}", inconclusive=True) for s in steps}
        except Exception as exc:  # what the node supplied cannot be run (wrong shapes, ...): it fails
            log.exception("audit.error", node=first.batch.node, session=first.session, steps=steps)
            verdicts = {s: Verdict(False, f"{type(exc).__name__}: {exc}") for s in steps}
        self.passes += 1
        self.schedule.judged(tkey, opened_session=opens_session, outcome=_outcome(verdicts.values()))
        reports: dict[str, list[AuditResult]] = {}  # one report per coordinator (one, but for a term change)
        for req, coordinator in requests:
            reports.setdefault(coordinator, []).extend(self._results(req, verdicts))
        for coordinator, results in reports.items():
            self.report(coordinator, AuditReport(results))

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

    async def _check(self, tkey: TrackKey, req: AuditRequest, requests: list[AuditRequest],
                     steps: list[int]) -> dict[int, Verdict]:
        b = req.batch
        spec = StageSpec(b.start, b.end, embed=b.stage == 0, head=b.stage == req.n_stages - 1)
        try:
            skey, digest = await self._stage(spec, b.backend, b.weight_mode)
        except (asyncio.CancelledError, BrokenProcessPool):
            raise
        except Exception as exc:  # MemoryError, a bad file here, ...: nothing the audited node did
            raise _OwnTrouble(f"loading layers [{b.start}, {b.end}): {type(exc).__name__}: {exc}") from exc
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
            fetch = fetch_of(req, track.next_step, steps)
            try:
                data = await self.fetch(b.node, fetch)
            except AskTimeout:  # it holds a link to us and did not answer: its failure
                return {s: Verdict(False, f"the audited node did not answer the fetch within {FETCH_TIMEOUT_S:g} s")
                        for s in steps}
            except (PeerUnreachable, ActorDead):
                raise
            except ActorsError as exc:  # its handler failed, or its answer did not decode
                return {s: Verdict(False, f"the audited node's answer failed: {type(exc).__name__}: {exc}")
                        for s in steps}
            wrong = _wrong_answer(fetch, data, records)
            if wrong is not None:
                log.warning("audit.wrong_answer", node=b.node, session=req.session, steps=steps, reason=wrong)
                return {s: Verdict(False, wrong) for s in steps}
            turn = self.schedule.turn(tkey, from_start=track.next_step == 0)
            queued = time.perf_counter()
            async with self._turn(turn):
                started = time.perf_counter()
                needed = {s: records[s] for s in data.steps if s in records}
                try:
                    verdicts, cpu = await self.compute.check(track.skey, track.key, needed, data, steps,
                                                             producer_backend=b.backend, weight_mode=b.weight_mode,
                                                             last=spec.head, urgent=turn < Turn.LATER)
                except MemoryError as exc:  # the answer's size was checked against the records: ours
                    track.next_step = 0
                    raise _OwnTrouble(f"out of memory in the audit pass: {exc}") from exc
            self.compute_s += cpu
            if any(v.inconclusive for v in verdicts.values()):  # records we lost: start over next time
                track.next_step = 0
                await self.compute.free(track.skey, track.key)
                return verdicts
            log.info("audit.pass", node=b.node, stage=b.stage, steps=steps, round=req.round,
                     waited_ms=round((started - queued) * 1e3, 1), pass_ms=round((time.perf_counter() - started) * 1e3, 1),
                     cpu_ms=round(cpu * 1e3, 1))
            if all(v.ok for v in verdicts.values()):
                track.next_step = steps[-1] + 1
            else:
                track.next_step = 0
                await self.compute.free(track.skey, track.key)
            return verdicts


def fetch_of(req: AuditRequest, from_step: int, steps: list[int]) -> AuditFetch:
    """What an auditor asks the audited node for ``req``'s ``steps``: the inputs from
    ``from_step`` on, the outputs of ``steps``, and the coordinator's warrant to show."""
    b = req.batch
    return AuditFetch(b.term, b.version, req.session, from_step, steps[-1], steps, warrant=req.warrant)


class _OwnTrouble(Exception):
    """Something on the auditor's side stopped a pass: no judgement of the audited node."""


def _wrong_answer(fetch: AuditFetch, data: object, records: dict[int, StepRecord]) -> str | None:
    """Why ``data`` is not an answer to ``fetch`` from the node that signed ``records``
    (None: it is well formed; check_steps then checks its digests). An honest stage
    answers with exactly the steps from ``fetch.from_step`` to ``fetch.step`` it committed,
    each at its committed position and length, and the outputs asked for."""
    if not isinstance(data, AuditData):
        return f"the audited node answered the fetch with a {type(data).__name__}"
    if not data.ok:
        return f"the audited node could not supply the step: {data.error}"
    n = len(data.steps)
    if not n or len(data.start_pos) != n or len(data.lengths) != n:
        return "the answer's steps, positions and lengths do not match"
    if any(b <= a for a, b in zip(data.steps, data.steps[1:])) or data.steps[0] < fetch.from_step \
            or data.steps[-1] != fetch.step:
        return f"the answer holds steps {data.steps[0]}..{data.steps[-1]}, not {fetch.from_step}..{fetch.step}"
    for s, pos, length in zip(data.steps, data.start_pos, data.lengths):
        rec = records.get(s)
        if rec is not None and (rec.start_pos, rec.length) != (pos, length):
            return f"step {s} is at position {pos} ({length} rows), committed at {rec.start_pos} ({rec.length})"
    if data.inputs is None or getattr(data.inputs, "ndim", 0) not in (1, 2) or len(data.inputs) != sum(data.lengths):
        return "the answer's inputs do not have the rows its lengths say"
    wanted = sorted(set(fetch.outputs_of or [fetch.step]))
    if list(data.output_steps) != wanted or len(data.output_lengths) != len(wanted):
        return f"the answer's outputs are of steps {list(data.output_steps)}, not {wanted}"
    if data.outputs is None or getattr(data.outputs, "ndim", 0) != 2 \
            or data.outputs.shape[0] != sum(data.output_lengths):
        return "the answer's outputs do not have the rows its lengths say"
    return None


def _outcome(verdicts) -> Outcome:
    """A pass's verdicts as probation counts them."""
    verdicts = list(verdicts)
    if any(not v.ok and not v.inconclusive for v in verdicts):
        return Outcome.FAILED
    if verdicts and all(v.ok for v in verdicts):
        return Outcome.CLEAN
    return Outcome.INCONCLUSIVE
