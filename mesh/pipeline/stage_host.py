"""The stage a node runs in the current plan: load its layers, take steps, batch them,
check what arrives, forward what it computes.

Everything arrives as messages; compute runs on the node's ComputeRunner thread so the
event loop (heartbeats, elections) never waits for a forward pass. Steps that queue up
while a forward pass runs are taken together in the next one: continuous batching.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import structlog

from kernels.digest import tensor_digest
from kernels.runner import ComputeRunner
from kernels.sampling import SamplingParams, sample
from kernels.stage import Stage, StageInputError, StageSpec, StepInput, load_stage
from mesh.pipeline.messages import (
    EndSession,
    Forward,
    PlanUpdate,
    Retransmit,
    SessionFailed,
    SessionMeta,
    StageEntry,
    StageReady,
    TokenOut,
)

log = structlog.get_logger("mesh.stage")

Send = Callable[[str, str, object], None]  # (node id, actor name, message)
STAGE_ACTOR = "stage"
SERVE_ACTOR = "serve"
COORD_ACTOR = "coord"


@dataclass
class _Work:
    msg: Forward
    tensor: np.ndarray


@dataclass
class StageStats:
    steps: int = 0
    batches: int = 0
    tokens_sampled: int = 0
    digest_mismatches: int = 0
    retransmits_sent: int = 0
    stale_dropped: int = 0
    busy_s: float = 0.0  # from handing a batch to the compute thread to the loop taking its outputs
    compute_s: float = 0.0  # of which the forward passes themselves (wall time on the compute thread)
    cpu_s: float = 0.0  # and the compute thread's CPU time in them
    last_step_at: float = float("-inf")  # time.monotonic() at the end of the last forward pass
    batch_sizes: dict[int, int] = field(default_factory=dict)


class StageHost:
    """One node's part of the pipeline. ``send`` delivers a message to an actor on a node."""

    def __init__(self, node_id: str, model_path: Path, *, backend: str, weight_mode: str,
                 runner: ComputeRunner, send: Send, max_batch: int = 16,
                 wire_fault: Callable[[np.ndarray], np.ndarray] | None = None):
        self.node_id = node_id
        self.model_path = model_path
        self.backend = backend
        self.weight_mode = weight_mode
        self.runner = runner
        self.send = send
        self.max_batch = max_batch
        self.wire_fault = wire_fault
        self.verifier = None  # mesh.verify.recorder.StageRecorder, set by the node
        self.epoch: tuple[int, int] = (0, 0)
        self.entry: StageEntry | None = None
        self.stages: list[StageEntry] = []
        self.stage: Stage | None = None
        self.meta: dict[str, SessionMeta] = {}
        self.last_sent: dict[str, tuple[str, Forward]] = {}
        self.front: dict[str, int] = {}  # first stage: the furthest step of each session it started
        self.queue: asyncio.Queue[_Work] = asyncio.Queue()
        self.stats = StageStats()
        self._task: asyncio.Task | None = None
        self._loading: asyncio.Lock = asyncio.Lock()
        self._to_free: list[str] = []
        self._ended: dict[str, None] = {}  # recently ended sessions, oldest first (bounded)
        self._releases: set[asyncio.Future] = set()
        self._ready: StageReady | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stage-host")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def is_first(self) -> bool:
        return self.entry is not None and self.entry.index == 0

    @property
    def is_last(self) -> bool:
        return self.entry is not None and self.entry.index == len(self.stages) - 1

    # -- plan -------------------------------------------------------------------------

    async def apply_plan(self, update: PlanUpdate) -> StageReady:
        """Switch to a new plan: drop old sessions, load this node's layers if they changed.

        Idempotent per plan: the coordinator re-sends its plan now and then, and a node
        answers with the outcome it already has (after its load finishes)."""
        epoch = (update.term, update.version)
        async with self._loading:
            if epoch < self.epoch:
                return StageReady(update.term, update.version, self.node_id, ok=False, error="stale plan")
            if epoch == self.epoch and self._ready is not None:
                return self._ready
            self.epoch = epoch
            self._ready = None
            self.stages = list(update.stages)
            mine = next((s for s in update.stages if s.node == self.node_id), None)
            # Every session is replayed from its start on the new plan: old caches are useless.
            for session in list(self.meta):
                self._free(session)
            self.last_sent.clear()
            if self.stage is not None:
                await self.runner.run(self._release, self.stage, self._take_frees())
            self._ready = await self._load(update, mine)
            return self._ready

    async def _load(self, update: PlanUpdate, mine: StageEntry | None) -> StageReady:
        started = time.perf_counter()
        if mine is None:
            self.entry, self.stage = None, None
            return StageReady(update.term, update.version, self.node_id, ok=True)
        n = len(update.stages)
        spec = StageSpec(mine.start, mine.end, embed=mine.index == 0, head=mine.index == n - 1)
        try:
            if self.stage is None or self.stage.spec != spec:
                log.info("stage.loading", index=mine.index, layers=[mine.start, mine.end], embed=spec.embed,
                         head=spec.head, backend=self.backend, weight_mode=self.weight_mode)
                self.entry, self.stage = None, None  # release the old layers before loading the new ones
                self.stage = await self.runner.run(load_stage, self.model_path, spec, self.backend,
                                                   self.weight_mode)
        except Exception as exc:  # a node that cannot load tells the coordinator why
            log.error("stage.load_failed", spec=str(spec), error=str(exc))
            self.entry = None
            return StageReady(update.term, update.version, self.node_id, ok=False,
                              error=f"{type(exc).__name__}: {exc}")
        self.entry = mine
        if self.verifier is not None:
            self.verifier.on_loaded(self)
        load_s = time.perf_counter() - started
        log.info("stage.ready", index=mine.index, layers=[mine.start, mine.end], load_s=round(load_s, 3),
                 epoch=(update.term, update.version))
        return StageReady(update.term, update.version, self.node_id, ok=True, load_s=load_s)

    # -- messages -----------------------------------------------------------------------

    def on_forward(self, msg: Forward) -> None:
        if (msg.term, msg.version) != self.epoch or self.entry is None:
            self.stats.stale_dropped += 1
            log.debug("forward.stale", session=msg.session, epoch=(msg.term, msg.version), current=self.epoch)
            return
        tensor = msg.tokens if msg.tokens is not None else msg.hidden
        if tensor is None or tensor_digest(tensor) != msg.digest:
            self.stats.digest_mismatches += 1
            if self.verifier is not None:
                self.verifier.on_digest_mismatch(self, msg, b"" if tensor is None else tensor_digest(tensor))
            log.warning("forward.digest_mismatch", session=msg.session, step=msg.step, sender=msg.sender)
            # The node's stage actor hands a Retransmit to both its stage and its serving side.
            self.send(msg.sender, STAGE_ACTOR, Retransmit(msg.term, msg.version, msg.session, msg.step,
                                                          "digest mismatch"))
            return
        if msg.session in self._ended:
            return  # the session's EndSession overtook this step: caching it would leak
        if msg.meta is not None:
            self.meta[msg.session] = msg.meta
            self.front[msg.session] = max(self.front.get(msg.session, -1), msg.step)
        elif msg.session not in self.meta:
            log.debug("forward.unknown_session", session=msg.session)
            return
        self.queue.put_nowait(_Work(msg, tensor))

    def on_token(self, msg: TokenOut) -> None:
        """The ring: the last stage's token comes back to the first stage as the next step."""
        if (msg.term, msg.version) != self.epoch or not self.is_first or msg.finish_reason:
            return
        meta = self.meta.get(msg.session)
        if meta is None or msg.seq + 1 <= self.front.get(msg.session, -1):
            return  # a second chain of the session (a replay while its step was slow): keep one
        self.front[msg.session] = msg.seq + 1
        tokens = np.array([msg.token], dtype=np.int32)
        fwd = Forward(msg.term, msg.version, msg.session, step=msg.seq + 1, start_pos=meta.prompt_len + msg.seq,
                      sender=self.node_id, digest=tensor_digest(tokens), tokens=tokens)
        self.queue.put_nowait(_Work(fwd, tokens))

    def on_retransmit(self, msg: Retransmit) -> None:
        sent = self.last_sent.get(msg.session)
        if sent is None or sent[1].step != msg.step or (msg.term, msg.version) != self.epoch:
            return
        self.stats.retransmits_sent += 1
        log.info("forward.retransmit", session=msg.session, step=msg.step, reason=msg.reason)
        self.send(sent[0], STAGE_ACTOR, sent[1])  # the clean copy: faults apply to the wire only

    def on_end(self, msg: EndSession) -> None:
        if self.verifier is not None:
            self.verifier.on_end(self, msg.session)
        self._ended[msg.session] = None
        if len(self._ended) > 4096:
            del self._ended[next(iter(self._ended))]
        self._free(msg.session)
        if self.stage is not None:  # free now: an idle stage must not keep a gone client's cache
            release = asyncio.ensure_future(self.runner.run(self._release, self.stage, self._take_frees()))
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)

    def _free(self, session: str) -> None:
        self.meta.pop(session, None)
        self.last_sent.pop(session, None)
        self.front.pop(session, None)
        self._to_free.append(session)  # the KV cache belongs to the compute thread: freed there

    # -- the batching loop --------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()
            batch = [first]
            seen = {first.msg.session}
            deferred = []
            while not self.queue.empty() and len(batch) < self.max_batch:
                work = self.queue.get_nowait()
                (deferred if work.msg.session in seen else batch).append(work)
                seen.add(work.msg.session)
            for work in deferred:
                self.queue.put_nowait(work)
            await self._step(batch)

    async def _step(self, batch: list[_Work]) -> None:
        epoch = self.epoch
        batch = [w for w in batch if (w.msg.term, w.msg.version) == epoch and w.msg.session in self.meta]
        stage = self.stage
        if not batch or stage is None:
            return
        items = [StepInput(w.msg.session, w.msg.start_pos,
                           tokens=w.tensor if stage.spec.embed else None,
                           hidden=None if stage.spec.embed else w.tensor) for w in batch]
        started = time.perf_counter()
        try:
            outputs = await self.runner.run(self._forward_pass, stage, items, self._take_frees())
            results = list(zip(batch, outputs))
        except StageInputError:
            results = []
            for work, item in zip(batch, items):  # find the bad step, keep the others
                try:
                    results.append((work, (await self.runner.run(stage.forward, [item]))[0]))
                except StageInputError as exc:
                    self._fail(work.msg, str(exc))
        self.stats.busy_s += time.perf_counter() - started
        self.stats.last_step_at = time.monotonic()
        self.stats.batches += 1
        self.stats.steps += len(batch)
        self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
        if self.epoch != epoch:
            return  # the plan changed while we computed: these outputs belong to nobody
        if self.verifier is not None:
            results = self.verifier.outputs(self, results)
        if self.is_last:
            await self._sample_and_emit(results)
        else:
            nxt = self.stages[self.entry.index + 1].node
            for work, out in results:
                self._forward(nxt, work.msg, out)

    def _take_frees(self) -> list[str]:
        """Sessions to free, taken on the event loop thread (where _free appends)."""
        freeing, self._to_free = self._to_free, []
        return freeing

    def _release(self, stage: Stage, sessions: list[str]) -> None:
        for session in sessions:
            stage.free(session)

    def _forward_pass(self, stage: Stage, items: list[StepInput], freeing: list[str]) -> list[np.ndarray]:
        self._release(stage, freeing)
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return stage.forward(items)
        finally:  # on the compute thread, one batch at a time: no race with the loop's reads
            self.stats.compute_s += time.perf_counter() - wall
            self.stats.cpu_s += time.thread_time() - cpu

    def _forward(self, node: str, src: Forward, hidden: np.ndarray) -> None:
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        fwd = Forward(src.term, src.version, src.session, src.step, src.start_pos, sender=self.node_id,
                      digest=tensor_digest(hidden), hidden=hidden, meta=src.meta)
        self.last_sent[src.session] = (node, fwd)
        sent = fwd if self.wire_fault is None else Forward(**{**fwd.__dict__, "hidden": self.wire_fault(hidden)})
        self.send(node, STAGE_ACTOR, sent)
        if self.verifier is not None:  # after the send: the next stage need not wait for the signature
            self.verifier.commit(self, src, hidden, fwd.digest)

    async def _sample_and_emit(self, results: list[tuple[_Work, np.ndarray]]) -> None:
        picks = []
        for work, logits in results:
            meta = self.meta.get(work.msg.session)
            if meta is None:
                continue  # ended while we computed
            position = work.msg.start_pos + work.tensor.shape[0]  # position of the token being sampled
            params = SamplingParams(temperature=meta.temperature, top_k=meta.top_k, top_p=meta.top_p,
                                    seed=meta.seed)
            picks.append((work, meta, position, logits[-1], params))
        tokens = await self.runner.run(lambda: [sample(row, p, pos) for _, _, pos, row, p in picks])
        for (work, meta, position, row, _), token in zip(picks, tokens):
            seq = position - meta.prompt_len
            finish = None
            if token in meta.eos_ids:
                finish = "stop"
            elif seq + 1 >= meta.max_tokens:
                finish = "length"
            self.stats.tokens_sampled += 1
            out = TokenOut(work.msg.term, work.msg.version, work.msg.session, seq, int(token), finish)
            self.send(meta.serve_node, SERVE_ACTOR, out)
            if finish is None:
                first = self.stages[0].node
                if first == self.node_id:
                    self.on_token(out)
                else:
                    self.send(first, STAGE_ACTOR, out)
        if self.verifier is not None:  # after the sends: digesting the logits is off the token's path
            for (work, _, _, row, _), token in zip(picks, tokens):
                self.verifier.commit(self, work.msg, np.ascontiguousarray(row[None], dtype=np.float32),
                                     token=int(token))

    def _fail(self, msg: Forward, error: str) -> None:
        meta = self.meta.get(msg.session)
        log.warning("session.failed", session=msg.session, error=error)
        if meta is not None:
            self.send(meta.serve_node, SERVE_ACTOR, SessionFailed(msg.term, msg.version, msg.session, error))
        self._free(msg.session)
