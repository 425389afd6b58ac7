"""The stage side of verification: commit every step, keep what an auditor needs.

The recorder is the stage's `StageObserver` (mesh/pipeline/stage_host.py): told when
its layers are loaded (faults that change weights), handed a forward pass's outputs and
each wire tensor (faults that change them), told when it sends an output or samples a
token (the commitment), and when what arrives does not hash to its digest (a wire fault
report). Records are signed per chunk
of steps (a Merkle root) and sent to the coordinator; the inputs of every step and the
outputs of recent steps stay here, bounded, for the auditors to fetch.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import structlog

from actors.identity import NodeIdentity
from kernels.digest import tensor_digest
from kernels.sampling import GREEDY, SamplingParams
from kernels.stage import Stage
from mesh.pipeline.messages import Forward, StageEntry
from mesh.pipeline.plan import Epoch
from mesh.verify.commitment import forward_bytes, forward_signed, sign_batch
from mesh.testing.faults import Fault
from mesh.verify.messages import AuditData, AuditFetch, CommitBatch, StepRecord, WireFault

log = structlog.get_logger("mesh.verify")

Send = Callable[[str, str, object], None]
VERIFY_ACTOR = "verify"
# A committed output stays fetchable this long (an auditor's later pass waits up to
# MESH_AUDIT_DEFER_S, 20 s, for an answer to end, then gathers and queues), within a
# byte budget across sessions: the head stage's outputs are 49,152 logits (196 KB) a step.
# A step an auditor asks for that is gone fails its audit, so the bounds are generous.
RETAIN_S = 60.0
RETAIN_BYTES = 1024 * 2 ** 20  # VerifyConfig.retain_mb
UNSENT_BATCHES = 256  # kept for a coordinator to come: about 2k steps of records


@dataclass
class _SessionLog:
    epoch: Epoch
    stage: StageEntry | None = None  # the stage of the plan that committed these steps
    inputs: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)  # step -> (start_pos, tensor)
    outputs: OrderedDict = field(default_factory=OrderedDict)  # step -> committed output
    pending: list[StepRecord] = field(default_factory=list)
    pending_since: float = 0.0
    chunk: int = 1  # the size of the next chunk: 1 (the prefill), then 2, 4, ... up to the recorder's chunk
    last_honest: np.ndarray | None = None
    sampling: SamplingParams = GREEDY
    upstream_key: bytes = b""  # the key of the stage before, whose signed Forwards these inputs are


class StageRecorder:
    def __init__(self, identity: NodeIdentity, send: Send, coordinator: Callable[[], str | None], *,
                 backend: str, weight_mode: str, fault: Fault | None = None, chunk: int = 8,
                 flush_s: float = 1.0, max_sessions: int = 64, retain_s: float = RETAIN_S,
                 retain_bytes: int = RETAIN_BYTES, clock: Callable[[], float] = time.monotonic):
        self.identity = identity
        self.backend = backend
        self.weight_mode = weight_mode
        self.stage: Stage | None = None  # this node's loaded stage and its place in the plan
        self.entry: StageEntry | None = None
        self.send = send
        self.coordinator = coordinator
        self.fault = fault
        self._cheater: bool | None = None
        self.chunk = chunk
        self.flush_s = flush_s
        self.max_sessions = max_sessions
        self.retain_s = retain_s
        self.retain_bytes = retain_bytes
        self.clock = clock
        # every committed output in order: (when, its session's log, step, the array)
        self._kept: deque[tuple[float, _SessionLog, int, np.ndarray]] = deque()
        self.kept_bytes = 0
        self.dropped_young = 0  # outputs dropped younger than retain_s (the byte budget was full)
        # (session, epoch) -> log: a replay on a new plan keeps the old plan's steps auditable
        self.sessions: OrderedDict[tuple[str, Epoch], _SessionLog] = OrderedDict()
        self.commitments = 0
        self.batches = 0
        self.wire_faults_seen = 0
        self.commit_s = 0.0
        self.fetches = 0
        self._late: deque[tuple[float, CommitBatch]] = deque()  # withhold:late=S (a fault): batches held back
        # batches signed while no coordinator was known, or whose send failed: sent once one is
        self._unsent: deque[CommitBatch] = deque(maxlen=UNSENT_BATCHES)

    # -- the StageObserver hooks -----------------------------------------------------------

    def on_loaded(self, stage: Stage, entry: StageEntry, epoch: Epoch) -> None:
        self.stage, self.entry = stage, entry
        if self._cheats() and self.fault.kind in ("skip-layer", "noise"):
            self.fault.corrupt_stage(stage)
            log.warning("fault.active", kind=self.fault.kind, value=self.fault.value, stage=entry.index)

    def seal(self, fwd: Forward) -> Forward:
        """Sign the Forward's digest. lie-digest (a fault): send other bytes, digested and
        signed as they are (so the next stage takes them), while this stage commits the
        honest output's digest and keeps the honest tensor for its auditors."""
        if self._cheats() and self.fault.kind == "lie-digest":
            bad = self.fault.garbage(fwd.hidden)
            fwd = Forward(**{**fwd.__dict__, "hidden": bad, "digest": tensor_digest(bad)})
        signature = self.identity.sign(forward_bytes(fwd.term, fwd.version, fwd.session, fwd.step, fwd.start_pos,
                                                     fwd.sender, fwd.digest))
        return Forward(**{**fwd.__dict__, "public_key": self.identity.public_key, "signature": signature})

    def accepts(self, msg: Forward) -> bool:
        return forward_signed(msg.public_key, msg.signature, msg.term, msg.version, msg.session, msg.step,
                              msg.start_pos, msg.sender, msg.digest)

    def wire(self, tensor: np.ndarray) -> np.ndarray:
        if self._cheats() and self.fault.kind == "corrupt-wire":
            return self.fault.wire(tensor)
        return tensor

    def outputs(self, epoch: Epoch, results: list[tuple[Forward, np.ndarray]]) -> list[np.ndarray]:
        """Apply output faults (tamper, stale) to a forward pass's results."""
        if not self._cheats() or self.fault.kind not in ("tamper", "stale"):
            return [value for _, value in results]
        out = []
        for msg, value in results:
            s = self._session(msg.session, epoch)
            bad = self.fault.output(s.last_honest, value)
            s.last_honest = np.array(value, copy=True)
            out.append(bad)
        return out

    def on_sent(self, src: Forward, output: np.ndarray, digest: bytes) -> None:
        self._commit(src, output, digest)

    def on_sampled(self, src: Forward, logits: np.ndarray, token: int) -> None:
        self._commit(src, logits, None, token)

    def _commit(self, src: Forward, output: np.ndarray, output_digest: bytes | None, token: int = -1) -> None:
        """Record one step (``src`` is the Forward that came in) and sign the chunk when full."""
        started = time.perf_counter()
        tensor = src.tokens if src.tokens is not None else src.hidden
        s = self._session(src.session, Epoch.of(src))
        digest = output_digest if output_digest is not None else tensor_digest(output)
        s.inputs[src.step] = (src.start_pos, tensor)
        self._keep(s, src.step, output)
        if src.meta is not None:
            s.sampling = src.meta.sampling
        if src.signature:
            s.upstream_key = src.public_key
        now = self.clock()
        if not s.pending:
            s.pending_since = now
        s.pending.append(StepRecord(src.session, src.step, src.start_pos, int(tensor.shape[0]), src.digest,
                                    digest, int(token), src.signature))
        self.commitments += 1
        # a chunk goes out when full or 1 s old: the coordinator can only audit what it holds, and
        # every batch is a signature, a message and a verification. Chunks start small and double
        # (the prefill alone, then 2, 4, 8 steps): a cheat shows from a session's first steps.
        if len(s.pending) >= s.chunk or now - s.pending_since >= self.flush_s:
            s.chunk = min(2 * s.chunk, self.chunk)
            self._flush(s)
        self.commit_s += time.perf_counter() - started

    def on_end(self, session: str, epoch: Epoch) -> None:
        s = self.sessions.get((session, epoch))
        if s is not None and s.pending:
            self._flush(s)

    def flush_due(self) -> None:
        """Send every chunk that waited ``flush_s`` (called on a timer): a session whose next
        step is slow, or that stalled, still has its records at the coordinator within
        ``flush_s`` of their signing — the coordinator's deadline (ledger.COMMIT_DEADLINE_S)
        counts on it."""
        now = self.clock()
        self._send_unsent()
        for s in list(self.sessions.values()):
            if s.pending and now - s.pending_since >= self.flush_s:
                self._flush(s)
        while self._late and self._late[0][0] <= now:
            coord = self.coordinator()
            batch = self._late.popleft()[1]
            if coord is not None:
                self.send(coord, VERIFY_ACTOR, batch)

    def on_digest_mismatch(self, msg: Forward, actual: bytes) -> None:
        self.wire_faults_seen += 1
        coord = self.coordinator()
        if coord is not None:
            self.send(coord, VERIFY_ACTOR, WireFault(msg.term, msg.version, self.identity.node_id, msg.sender,
                                                     msg.session, msg.step, msg.digest, actual))

    # -- what auditors fetch ------------------------------------------------------------

    def fetch(self, req: AuditFetch):
        """An auditor's AuditFetch: the committed inputs and outputs it asks for."""
        self.fetches += 1
        if self._cheats() and self.fault.kind == "refuse-fetch":
            return self.fault.refuse(self._fetch(req), self.fetches)
        return self._fetch(req)

    def _fetch(self, req: AuditFetch) -> AuditData:
        s = self.sessions.get((req.session, Epoch.of(req)))
        if s is None:
            return AuditData(False, "session not held (evicted from the retention window, or another plan)")
        steps = sorted(k for k in s.inputs if req.from_step <= k <= req.step)
        wanted = sorted(set(req.outputs_of or [req.step]))
        missing = [k for k in wanted if k not in s.outputs]
        if not steps or steps[-1] != req.step or missing:
            return AuditData(False, f"step {missing[0] if missing else req.step} is not retained")
        outputs = [np.asarray(s.outputs[k]).reshape(-1, np.asarray(s.outputs[k]).shape[-1]) for k in wanted]
        return AuditData(True, "", steps, [s.inputs[k][0] for k in steps],
                         [int(s.inputs[k][1].shape[0]) for k in steps],
                         np.concatenate([s.inputs[k][1] for k in steps]), wanted, [len(o) for o in outputs],
                         np.concatenate(outputs), sampling=s.sampling)

    def stage_of(self, session: str, epoch: Epoch) -> StageEntry | None:
        """The stage that committed ``session``'s steps on ``epoch``'s plan, if this node holds them."""
        s = self.sessions.get((session, epoch))
        return s.stage if s is not None else None

    # -- internals ----------------------------------------------------------------------

    def _cheats(self) -> bool:
        """Whether this node misbehaves: decided by the first stage it is given, for good —
        ``stage=K:SPEC`` picks the node that first holds stage K, and the node that takes
        over stage K after it is evicted computes honestly."""
        if self.fault is None or self.entry is None:
            return False
        if self._cheater is None:
            self._cheater = self.fault.applies(self.entry.index)
        return self._cheater

    def _session(self, session: str, epoch: Epoch) -> _SessionLog:
        key = (session, epoch)
        s = self.sessions.get(key)
        if s is None:
            s = self.sessions[key] = _SessionLog(epoch, self.entry)
        self.sessions.move_to_end(key)
        while len(self.sessions) > self.max_sessions:
            old = self.sessions.popitem(last=False)[1]
            if old.pending:  # its records are owed to the coordinator all the same
                self._flush(old)
            self.kept_bytes -= sum(o.nbytes for o in old.outputs.values())
            old.outputs.clear()
        return s

    def _keep(self, s: _SessionLog, step: int, output: np.ndarray) -> None:
        """Keep ``output`` fetchable; drop outputs older than retain_s, or the oldest while
        over the byte budget."""
        now = self.clock()
        old = s.outputs.pop(step, None)  # a replayed step: the newer output is the one committed
        if old is not None:
            self.kept_bytes -= old.nbytes
        s.outputs[step] = output
        self.kept_bytes += output.nbytes
        self._kept.append((now, s, step, output))
        while self._kept:
            when, log_, k, arr = self._kept[0]
            if log_.outputs.get(k) is not arr:  # replaced, or its session was evicted
                self._kept.popleft()
                continue
            young = now - when <= self.retain_s
            if young and self.kept_bytes <= self.retain_bytes:
                break
            if young:
                self.dropped_young += 1
                if self.dropped_young == 1:
                    log.warning("verify.retention_full", budget_mb=self.retain_bytes >> 20,
                                hint="raise MESH_VERIFY_RETAIN_MB (VerifyConfig.retain_mb): audits of dropped steps fail")
            self._kept.popleft()
            del log_.outputs[k]
            self.kept_bytes -= arr.nbytes

    def _flush(self, s: _SessionLog) -> None:
        records, s.pending = s.pending, []
        # the stage of the plan that committed these steps (the node may hold another one now)
        entry, stage = s.stage or self.entry, self.stage
        if entry is None or stage is None:
            return
        batch = sign_batch(self.identity, term=s.epoch.term, version=s.epoch.version, stage=entry.index,
                           start=entry.start, end=entry.end, backend=self.backend, weight_mode=self.weight_mode,
                           weights_digest=stage.weights_digest, records=records, upstream_key=s.upstream_key)
        self.batches += 1
        if self._cheats() and self.fault.kind == "withhold":
            if self.fault.value > 0:  # withhold:late=S: every batch goes out S seconds late
                self._late.append((self.clock() + self.fault.value, batch))
            return  # withhold: never
        self._deliver(batch)

    def _deliver(self, batch: CommitBatch) -> None:
        """To the coordinator, or kept (bounded) until one is known: a batch lost while the
        coordinator changes or its link is down would leave the next stage's signed record
        of what it received unanswered, missing commitments against an honest stage. A
        batch of another term than the judge's is ignored there."""
        if self._unsent:  # in order: none goes out before those kept back
            self._unsent.append(batch)
            self._send_unsent()
            return
        coord = self.coordinator()
        if coord is None or self.send(coord, VERIFY_ACTOR, batch) is False:
            self._unsent.append(batch)

    def _send_unsent(self) -> None:
        coord = self.coordinator()
        while self._unsent and coord is not None:
            if self.send(coord, VERIFY_ACTOR, self._unsent[0]) is False:
                return
            self._unsent.popleft()
