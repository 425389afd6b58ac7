"""The stage a node runs in the current plan: load its layers, take steps, batch them,
check what arrives, forward what it computes.

Everything arrives as messages; compute runs on the node's ComputeRunner thread so the
event loop (heartbeats, elections) never waits for a forward pass. Steps that queue up
while a forward pass runs are taken together in the next one: continuous batching.

Verification (and the test-only faults) watch a stage through the `StageObserver` seam:
told when layers load, handed each pass's outputs and each wire tensor, and told what
was sent and sampled. The host never knows who observes it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import structlog

from kernels.digest import tensor_digest
from actors.clock import LOOP_CLOCK, Clock
from kernels.runner import ComputeRunner
from kernels.sampling import finish_reason, sample
from kernels.loader import load_stage
from kernels.stage import Stage, StageInputError, StageSpec, StepInput
from mesh.pipeline.messages import (
    EndSession,
    Forward,
    PlanUpdate,
    Retransmit,
    SessionFailed,
    SessionMeta,
    StageEntry,
    StageReady,
    StepLost,
    TokenOut,
)
from mesh.pipeline.plan import NO_EPOCH, Epoch

log = structlog.get_logger("mesh.stage")

Send = Callable[[str, str, object], bool | None]  # (node id, actor name, message) -> False: dropped
STAGE_ACTOR = "stage"
SERVE_ACTOR = "serve"
COORD_ACTOR = "coord"


@dataclass
class _Work:
    msg: Forward
    tensor: np.ndarray


class StageObserver(Protocol):
    """What watches a stage (verification's recorder; a test's fault). Called on the event
    loop; ``outputs`` and ``wire`` may replace tensors (faults), the others only record."""

    def on_loaded(self, stage: Stage, entry: StageEntry, epoch: Epoch) -> None:
        """This node's layers of plan ``epoch`` are loaded."""

    def outputs(self, epoch: Epoch, results: list[tuple[Forward, np.ndarray]]) -> list[np.ndarray]:
        """One forward pass's outputs, (input message, output) per step: what to use."""

    def seal(self, fwd: Forward) -> Forward:
        """A Forward to the next stage, its digest computed: the Forward to send (signed)."""

    def accepts(self, msg: Forward) -> bool:
        """Whether a Forward from the stage before carries its sender's valid signature."""

    def wire(self, tensor: np.ndarray) -> np.ndarray:
        """A hidden state about to go on the wire (after its digest): what to send."""

    def on_sent(self, src: Forward, output: np.ndarray, digest: bytes) -> None:
        """The output of step ``src`` went to the next stage."""

    def on_sampled(self, src: Forward, logits: np.ndarray, token: int) -> None:
        """The head stage sampled ``token`` from ``logits`` (1, vocab) for step ``src``."""

    def on_end(self, session: str, epoch: Epoch) -> None: ...

    def on_digest_mismatch(self, msg: Forward, actual: bytes) -> None:
        """What arrived does not hash to the digest its sender put on it."""


class NoObserver:
    """A stage nobody watches."""

    def on_loaded(self, stage: Stage, entry: StageEntry, epoch: Epoch) -> None:
        pass

    def outputs(self, epoch: Epoch, results: list[tuple[Forward, np.ndarray]]) -> list[np.ndarray]:
        return [out for _, out in results]

    def seal(self, fwd: Forward) -> Forward:
        return fwd

    def accepts(self, msg: Forward) -> bool:
        return True

    def wire(self, tensor: np.ndarray) -> np.ndarray:
        return tensor

    def on_sent(self, src: Forward, output: np.ndarray, digest: bytes) -> None:
        pass

    def on_sampled(self, src: Forward, logits: np.ndarray, token: int) -> None:
        pass

    def on_end(self, session: str, epoch: Epoch) -> None:
        pass

    def on_digest_mismatch(self, msg: Forward, actual: bytes) -> None:
        pass


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
    last_step_at: float = float("-inf")  # the clock's time at the end of the last forward pass
    batch_sizes: dict[int, int] = field(default_factory=dict)
    # one-session, one-token forward passes of the current layers (no head): what refines the speed score
    decode_layers: tuple[int, int] | None = None
    decode_samples: int = 0
    decode_best_s: float = float("inf")

    def record_decode(self, layers: tuple[int, int], seconds: float) -> None:
        if layers != self.decode_layers:  # new layers: their own record
            self.decode_layers, self.decode_samples, self.decode_best_s = layers, 0, float("inf")
        self.decode_samples += 1
        self.decode_best_s = min(self.decode_best_s, seconds)


class StageHost:
    """One node's part of the pipeline. ``send`` delivers a message to an actor on a node."""

    def __init__(self, node_id: str, model_path: Path, *, backend: str, weight_mode: str,
                 runner: ComputeRunner, send: Send, max_batch: int = 16, clock: Clock = LOOP_CLOCK,
                 observer: StageObserver | None = None):
        self.node_id = node_id
        self.model_path = model_path
        self.backend = backend
        self.weight_mode = weight_mode
        self.runner = runner
        self.send = send
        self.max_batch = max_batch
        self.clock = clock
        self.observer: StageObserver = observer if observer is not None else NoObserver()
        self.epoch: Epoch = NO_EPOCH  # the plan this host's layers and sessions belong to
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
        self._ended: dict[str, set[str]] = {}  # recently ended sessions -> who ended them, oldest first (bounded)
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
        self.stage, self.entry = None, None  # the layers go with the host (a process may run many nodes)

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
        epoch = Epoch.of(update)
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
        self.observer.on_loaded(self.stage, mine, Epoch.of(update))
        load_s = time.perf_counter() - started
        log.info("stage.ready", index=mine.index, layers=[mine.start, mine.end], load_s=round(load_s, 3),
                 epoch=str(Epoch.of(update)))
        return StageReady(update.term, update.version, self.node_id, ok=True, load_s=load_s)

    # -- messages -----------------------------------------------------------------------

    def on_forward(self, msg: Forward) -> None:
        if Epoch.of(msg) != self.epoch or self.entry is None:
            self.stats.stale_dropped += 1
            log.debug("forward.stale", session=msg.session, epoch=str(Epoch.of(msg)), current=str(self.epoch))
            return
        tensor = msg.tokens if msg.tokens is not None else msg.hidden
        actual = b"" if tensor is None else tensor_digest(tensor)
        # a hidden state must also carry its sender's signature on that digest: this stage
        # commits to it, and without it could not show who sent what (a broken link)
        if actual != msg.digest or (msg.hidden is not None and not self.observer.accepts(msg)):
            self.stats.digest_mismatches += 1
            self.observer.on_digest_mismatch(msg, actual)
            log.warning("forward.digest_mismatch", session=msg.session, step=msg.step, sender=msg.sender,
                        signed=actual == msg.digest)
            # The node's stage actor hands a Retransmit to both its stage and its serving side.
            self.send(msg.sender, STAGE_ACTOR, Retransmit(msg.term, msg.version, msg.session, msg.step,
                                                          "digest mismatch"))
            return
        enders = self._ended.get(msg.session)
        if enders is not None:
            if msg.meta is None or msg.meta.serve_node in enders:
                return  # the session's EndSession overtook this step: caching it would leak
            # ended only by nodes that do not serve it: no end at all
            for ender in sorted(enders):
                log.warning("link.forged", node=self.node_id, peer=ender, type="EndSession",
                            reason=f"ended session {msg.session} before its prefill, but {msg.meta.serve_node} serves it")
            del self._ended[msg.session]
        if msg.meta is not None:
            self.meta[msg.session] = msg.meta
            self.front[msg.session] = max(self.front.get(msg.session, -1), msg.step)
        elif msg.session not in self.meta:
            log.debug("forward.unknown_session", session=msg.session)
            return
        self.queue.put_nowait(_Work(msg, tensor))

    def on_token(self, msg: TokenOut) -> None:
        """The ring: the last stage's token comes back to the first stage as the next step."""
        if Epoch.of(msg) != self.epoch or not self.is_first or msg.finish_reason:
            return
        meta = self.meta.get(msg.session)
        if meta is None or msg.seq + 1 <= self.front.get(msg.session, -1):
            return  # a second chain of the session (a replay while its step was slow): keep one
        self.front[msg.session] = msg.seq + 1
        tokens = np.array([msg.token], dtype=np.int32)
        fwd = Forward(msg.term, msg.version, msg.session, step=msg.seq + 1, start_pos=meta.prompt_len + msg.seq,
                      sender=self.node_id, digest=tensor_digest(tokens), tokens=tokens)
        self.queue.put_nowait(_Work(fwd, tokens))

    def on_retransmit(self, msg: Retransmit, peer: str | None = None) -> None:
        """``peer`` asks for the step again (None: this node): only the node it went to may."""
        sent = self.last_sent.get(msg.session)
        if sent is None or sent[1].step != msg.step or Epoch.of(msg) != self.epoch:
            return
        if sent[0] != (peer or self.node_id):
            return
        self.stats.retransmits_sent += 1
        log.info("forward.retransmit", session=msg.session, step=msg.step, reason=msg.reason)
        self.send(sent[0], STAGE_ACTOR, sent[1])  # the clean copy: faults apply to the wire only

    def on_end(self, msg: EndSession, peer: str | None = None) -> str | None:
        """``peer`` (None: this node) ends a session: only its serving node may. Returns why
        the end is refused, or None. The end of a session not seen yet (it overtook the
        prefill) is kept with its sender, and holds only if the prefill names it as serving."""
        ender = peer or self.node_id
        meta = self.meta.get(msg.session)
        if meta is not None and meta.serve_node != ender:
            return f"EndSession of session {msg.session} from {ender}, but {meta.serve_node} serves it"
        self.observer.on_end(msg.session, self.epoch)
        self._ended.setdefault(msg.session, set()).add(ender)
        if len(self._ended) > 4096:
            del self._ended[next(iter(self._ended))]
        self._free(msg.session)
        if self.stage is not None:  # free now: an idle stage must not keep a gone client's cache
            release = asyncio.ensure_future(self.runner.run(self._release, self.stage, self._take_frees()))
            self._releases.add(release)
            release.add_done_callback(self._releases.discard)
        return None

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
            try:
                await self._step(batch)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the loop
                # Whatever broke (a backend error, an observer, a send), these sessions
                # cannot go on; every later step still gets a stage that runs.
                log.error("stage.batch_failed", sessions=[w.msg.session for w in batch],
                          error=f"{type(exc).__name__}: {exc}"[:300])
                for work in batch:
                    if work.msg.session in self.meta:
                        self._fail(work.msg, f"stage {self.node_id} failed: {type(exc).__name__}: {exc}"[:300])

    async def _step(self, batch: list[_Work]) -> None:
        epoch = self.epoch
        batch = [w for w in batch if Epoch.of(w.msg) == epoch and w.msg.session in self.meta]
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
        except Exception as batch_error:  # noqa: BLE001 - a peer's bad step, or a backend failure
            if not isinstance(batch_error, StageInputError):
                log.warning("stage.batch_retried_per_item", sessions=len(batch),
                            error=f"{type(batch_error).__name__}: {batch_error}"[:300])
            results = []
            for work, item in zip(batch, items):  # find the bad step, keep the others
                try:
                    results.append((work, (await self.runner.run(stage.forward, [item]))[0]))
                except Exception as exc:  # noqa: BLE001 - fails this session only
                    error = str(exc) if isinstance(exc, StageInputError) else f"{type(exc).__name__}: {exc}"
                    self._fail(work.msg, f"stage {self.node_id}: {error}"[:300])
        self.stats.busy_s += time.perf_counter() - started
        self.stats.last_step_at = self.clock.now()
        self.stats.batches += 1
        self.stats.steps += len(batch)
        self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
        if self.epoch != epoch:
            return  # the plan changed while we computed: these outputs belong to nobody
        outputs = self.observer.outputs(epoch, [(work.msg, out) for work, out in results])
        results = [(work, out) for (work, _), out in zip(results, outputs, strict=True)]
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
            seconds = time.perf_counter() - wall
            self.stats.compute_s += seconds
            self.stats.cpu_s += time.thread_time() - cpu
            if len(items) == 1 and items[0].length == 1 and not stage.spec.head:
                # a head's matmul is no layer's cost: a score per layer from it would shrink the
                # last stage's share at every plan, and its step with it
                self.stats.record_decode((stage.spec.start, stage.spec.end), seconds)

    def _forward(self, node: str, src: Forward, hidden: np.ndarray) -> None:
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        digest = tensor_digest(hidden)
        fwd = self.observer.seal(Forward(src.term, src.version, src.session, src.step, src.start_pos,
                                         sender=self.node_id, digest=digest, hidden=hidden, meta=src.meta))
        self.last_sent[src.session] = (node, fwd)
        on_wire = self.observer.wire(fwd.hidden)
        sent = fwd if on_wire is fwd.hidden else Forward(**{**fwd.__dict__, "hidden": on_wire})
        if self.send(node, STAGE_ACTOR, sent) is False:
            self._lost(src)
        self.observer.on_sent(src, hidden, digest)  # after the send: the next stage need not wait for it

    async def _sample_and_emit(self, results: list[tuple[_Work, np.ndarray]]) -> None:
        picks = []
        for work, logits in results:
            meta = self.meta.get(work.msg.session)
            if meta is None:
                continue  # ended while we computed
            position = work.msg.start_pos + work.tensor.shape[0]  # position of the token being sampled
            picks.append((work, meta, position, logits[-1]))
        tokens = await self.runner.run(lambda: [sample(row, meta.sampling, pos) for _, meta, pos, row in picks])
        for (work, meta, position, row), token in zip(picks, tokens):
            seq = position - meta.prompt_len
            finish = finish_reason(int(token), seq, max_tokens=meta.max_tokens, eos_ids=meta.eos_ids)
            self.stats.tokens_sampled += 1
            out = TokenOut(work.msg.term, work.msg.version, work.msg.session, seq, int(token), finish)
            self.send(meta.serve_node, SERVE_ACTOR, out)
            if finish is None:
                first = self.stages[0].node
                if first == self.node_id:
                    self.on_token(out)
                else:
                    if self.send(first, STAGE_ACTOR, out) is False:
                        self._lost(work.msg)
        for (work, _, _, row), token in zip(picks, tokens):  # after the sends: off the token's path
            self.observer.on_sampled(work.msg, np.ascontiguousarray(row[None], dtype=np.float32), int(token))

    def _lost(self, msg: Forward) -> None:
        """The next hop of ``msg``'s session was dropped: tell the node that serves it."""
        meta = self.meta.get(msg.session)
        log.warning("forward.lost", session=msg.session, step=msg.step)
        if meta is not None:
            self.send(meta.serve_node, SERVE_ACTOR, StepLost(msg.term, msg.version, msg.session, msg.step))

    def _fail(self, msg: Forward, error: str) -> None:
        meta = self.meta.get(msg.session)
        log.warning("session.failed", session=msg.session, error=error)
        if meta is not None:
            self.send(meta.serve_node, SERVE_ACTOR, SessionFailed(msg.term, msg.version, msg.session, error))
        self._free(msg.session)
