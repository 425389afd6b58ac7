"""The coordinator's side of verification: the commitment log, the chain links, the
audit schedule, escalation and flags. No I/O: it takes messages and calls ``send``.

Audit selection uses a beacon secret drawn when the coordinator takes office and
never sent to a stage: a step is audited when BLAKE3(secret, leaf) < rate, which no
stage can predict before it signs the leaf. (Publishing BLAKE3(secret) at take-office
and the secret at step-down would let anyone re-check the schedule afterwards.)
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3
import structlog

from mesh.pipeline.plan import Epoch
from mesh.verify.commitment import CommitmentRejected, leaf_hash, verify_batch
from mesh.verify.messages import (
    AuditRequest,
    AuditResult,
    CommitBatch,
    StepRecord,
    WireFault,
)

log = structlog.get_logger("mesh.verify.ledger")

Send = Callable[[str, str, object], None]


@dataclass
class _Pending:
    audit_id: int
    request: AuditRequest  # the request that holds this audit now (the escalation's, once escalated)
    step: int
    auditors: list[str]
    sent_at: float
    results: list[AuditResult] = field(default_factory=list)


@dataclass
class Flag:
    node: str
    reason: str
    evidence: dict


class Ledger:
    def __init__(self, node_id: str, send: Send, flag: Callable[[Flag], None], *, audit_rate: float = 0.2,
                 max_sessions: int = 256, wire_strikes: int = 2, actor: str = "verify", audit_timeout_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic, audit_seed: str | None = None):
        self.node_id = node_id
        self.clock = clock
        # a fixed seed makes the audit schedule reproducible (tests, benches): whoever knows
        # it can predict which steps are audited, so a real mesh never sets one
        self.audit_seed = audit_seed
        self.send = send
        self.flag = flag
        self.audit_rate = audit_rate
        self.max_sessions = max_sessions
        self.wire_strikes = wire_strikes
        self.actor = actor
        self.audit_timeout_s = audit_timeout_s
        self.term = -1
        self.secret = b""
        # (term, version, session) -> stage -> step -> (record, batch)
        self.log: OrderedDict[tuple, dict[int, dict[int, tuple[StepRecord, CommitBatch]]]] = OrderedDict()
        self.pending: dict[int, _Pending] = {}
        # (term, version, session, stage, auditor) -> the last step whose record it was sent:
        # an auditor keeps the records, so each request carries only the new ones
        self.sent: OrderedDict[tuple, int] = OrderedDict()
        self.next_id = 1
        self.strikes: dict[str, list[WireFault]] = {}
        self.flagged: dict[str, Flag] = {}
        self.commitments = self.verified_links = self.broken_links = 0
        self.audits = self.audit_failures = self.rejected = self.expired = self.unauditable = 0

    def take_office(self, term: int) -> None:
        """Start a term: a fresh log and a fresh beacon secret.

        Tests and benches only (like ``--fault``): with MESH_AUDIT_SEED set, the secret is
        BLAKE3("mesh audit seed" || seed || term) instead of 32 random bytes, so a seeded
        run draws the same secret per term. It is never sent to a stage either way, but
        whoever knows the seed can predict the schedule: never set it in a real mesh.
        """
        if term != self.term:
            self.term = term
            self.secret = _beacon_secret(term, self.audit_seed)
            self.log.clear()
            self.pending.clear()
            self.sent.clear()

    # -- inputs ---------------------------------------------------------------------------

    def on_batch(self, b: CommitBatch, epoch: Epoch, stages: list, members: dict[str, str]) -> None:
        """``epoch``/``stages``: the current plan; ``members``: live node -> backend."""
        if Epoch.of(b) != epoch:
            return  # a plan that is gone: nobody will audit it
        entry = stages[b.stage] if 0 <= b.stage < len(stages) else None
        try:
            verify_batch(b, expect_node=entry.node if entry is not None else None)
            if entry is None or (entry.start, entry.end) != (b.start, b.end):
                raise CommitmentRejected(f"batch for stage {b.stage} [{b.start}, {b.end}) is not in the plan")
        except CommitmentRejected as exc:
            self.rejected += 1
            log.warning("commitment.rejected", node=b.node, error=str(exc))
            return
        self._expire()
        if not b.records:
            return
        key = (b.term, b.version, b.records[0].session)
        by_stage = self.log.setdefault(key, {})
        self.log.move_to_end(key)
        while len(self.log) > self.max_sessions:
            self.log.popitem(last=False)
        steps = by_stage.setdefault(b.stage, {})
        selected = []
        for r in b.records:
            if r.session != key[2]:
                continue
            steps[r.step] = (r, b)
            self.commitments += 1
            self._links(by_stage, b.stage, r)
            if b.node not in self.flagged and self._selected(r):
                selected.append(r.step)
        if selected:
            self._start_audit(key, b, selected, len(stages), members)

    def on_result(self, res: AuditResult, members: dict[str, str]) -> None:
        self.on_results([res], members)

    def on_results(self, results: list[AuditResult], members: dict[str, str]) -> None:
        """One auditor's pass (an AuditReport). Failed first audits go on to a second
        auditor, one request per batch; a second failure flags the node."""
        escalate: dict[tuple[int, str], tuple[CommitBatch, list[_Pending]]] = {}
        for res in results:
            p = self.pending.get(res.audit_id)
            if p is None or res.auditor != p.auditors[-1] or res.round != p.request.round or res.step != p.step:
                continue
            p.results.append(res)
            b = p.request.batch
            if res.inconclusive:  # it may have lost what it was sent (restarted, evicted): send all next time
                self.sent.pop((b.term, b.version, res.session, b.stage, res.auditor), None)
                del self.pending[res.audit_id]
                continue
            self.audits += 1
            if res.ok:
                del self.pending[res.audit_id]
                continue
            self.audit_failures += 1
            if p.request.round > 1:
                del self.pending[res.audit_id]
                self._flag(b.node, f"two audits failed: {res.reason}", {
                    "batch": _batch_json(b),
                    "audits": [_result_json(r) for r in p.results],
                })
                continue
            second = self._pick_auditor(b, members, exclude={res.auditor})
            if second is None:
                log.warning("audit.no_second_auditor", node=b.node, session=res.session, step=res.step)
                del self.pending[res.audit_id]
                continue
            log.warning("audit.escalated", node=b.node, first=res.auditor, second=second, reason=res.reason)
            escalate.setdefault((id(b), second), (b, []))[1].append(p)
        for (_, second), (b, pending) in escalate.items():
            # a flag drops the node's audits
            pending = sorted((p for p in pending if p.audit_id in self.pending), key=lambda p: p.step)
            if not pending:
                continue
            first = pending[0].request
            # the second auditor has nothing yet: every record up to the last step
            last = max(p.step for p in pending)
            records = self._records((b.term, b.version, first.session), b.stage, last) or first.records
            req = AuditRequest([p.audit_id for p in pending], 2, first.session, [p.step for p in pending], b,
                               records, first.n_stages)
            for p in pending:
                p.request, p.auditors, p.sent_at = req, p.auditors + [second], self.clock()
            self.send(second, self.actor, req)

    def on_wire_fault(self, w: WireFault) -> None:
        if w.sender in self.flagged:
            return
        strikes = self.strikes.setdefault(w.sender, [])
        strikes.append(w)
        log.warning("wire.corrupt", sender=w.sender, reporter=w.reporter, session=w.session, step=w.step)
        if len(strikes) >= self.wire_strikes:
            self._flag(w.sender, f"sent {len(strikes)} tensors that do not hash to their digests",
                       {"reports": [{"reporter": s.reporter, "session": s.session, "step": s.step,
                                     "claimed": s.claimed.hex(), "actual": s.actual.hex()} for s in strikes]})

    # -- internals ------------------------------------------------------------------------

    def _expire(self) -> None:
        """Forget audits nobody answered (the auditor died or was cut off): no judgement."""
        now = self.clock()
        for aid in [a for a, p in self.pending.items() if now - p.sent_at > self.audit_timeout_s]:
            del self.pending[aid]
            self.expired += 1

    def _selected(self, r: StepRecord) -> bool:
        u = int.from_bytes(blake3.blake3(self.secret + leaf_hash(r)).digest(8), "little") / 2.0 ** 64
        return u < self.audit_rate

    def _links(self, by_stage: dict, stage: int, r: StepRecord) -> None:
        for a, b in ((stage - 1, stage), (stage, stage + 1)):
            ra = by_stage.get(a, {}).get(r.step)
            rb = by_stage.get(b, {}).get(r.step)
            if ra is None or rb is None:
                continue
            if ra[0].output_digest == rb[0].input_digest:
                self.verified_links += 1
            else:
                self.broken_links += 1
                log.warning("chain.broken", session=r.session, step=r.step, stages=(a, b))

    def _pick_auditor(self, b: CommitBatch, members: dict[str, str], exclude: set[str]) -> str | None:
        order = auditor_order(b.stage, b.node, b.backend, members, exclude | set(self.flagged))
        return order[0] if order else None

    def _start_audit(self, key: tuple, b: CommitBatch, steps: list[int], n_stages: int,
                     members: dict[str, str]) -> None:
        """One request to one auditor for the selected ``steps`` of batch ``b``."""
        auditor = self._pick_auditor(b, members, exclude=set())
        if auditor is None:
            return
        records = self._records(key, b.stage, steps[-1])
        if not _complete(records):
            self.unauditable += len(steps)  # this log started mid-session (a new coordinator): inputs unverifiable
            return
        sent_key = (*key, b.stage, auditor)
        last = self.sent.get(sent_key, -1)
        self.sent[sent_key] = max(last, steps[-1])
        self.sent.move_to_end(sent_key)
        while len(self.sent) > 4 * self.max_sessions:
            self.sent.popitem(last=False)
        ids = list(range(self.next_id, self.next_id + len(steps)))
        self.next_id += len(steps)
        req = AuditRequest(ids, 1, key[2], steps, b, [x for x in records if x.step > last], n_stages)
        for aid, step in zip(ids, steps):
            self.pending[aid] = _Pending(aid, req, step, [auditor], self.clock())
        self.send(auditor, self.actor, req)

    def _records(self, key: tuple, stage: int, step: int) -> list[StepRecord]:
        steps = self.log.get(key, {}).get(stage, {})
        return [steps[s][0] for s in sorted(steps) if s <= step]

    def _flag(self, node: str, reason: str, evidence: dict) -> None:
        if node in self.flagged:
            return
        flag = Flag(node, reason, evidence)
        self.flagged[node] = flag
        for aid in [a for a, p in self.pending.items() if p.request.batch.node == node]:
            del self.pending[aid]
        log.error("node.flagged", node=node, reason=reason)
        self.flag(flag)


def _beacon_secret(term: int, seed: str | None) -> bytes:
    if seed is None:
        return os.urandom(32)
    return blake3.blake3(b"mesh audit seed" + seed.encode() + term.to_bytes(8, "little", signed=True)).digest()


def auditor_order(stage: int, producer: str, producer_backend: str, members: dict[str, str],
                  exclude: set[str] | frozenset = frozenset()) -> list[str]:
    """Who audits ``stage`` (held by ``producer``), first choice first: live nodes other than
    the producer, another backend first, then an order stable per stage — so an auditor
    keeps its loaded copy of the stage and its audit caches, and every node can tell
    in advance which stages it will audit (it loads them when a plan is ready)."""
    candidates = [n for n in members if n != producer and n not in exclude]
    return sorted(candidates, key=lambda n: (members[n] == producer_backend,
                                             blake3.blake3(f"{stage}|{n}".encode()).digest()))


def _complete(records: list[StepRecord]) -> bool:
    """Records from position 0 with no hole: every input the re-run needs is committed."""
    end = 0
    for i, r in enumerate(records):
        if r.start_pos > end or (i > 0 and r.step != records[i - 1].step + 1):
            return False
        end = r.start_pos + r.length
    return bool(records)


def _batch_json(b: CommitBatch) -> dict:
    return {"term": b.term, "version": b.version, "stage": b.stage, "layers": [b.start, b.end], "node": b.node,
            "public_key": b.public_key.hex(), "backend": b.backend, "weight_mode": b.weight_mode,
            "weights_digest": b.weights_digest.hex(), "root": b.root.hex(), "signature": b.signature.hex(),
            "records": [{"session": r.session, "step": r.step, "start_pos": r.start_pos, "length": r.length,
                         "input": r.input_digest.hex(), "output": r.output_digest.hex(), "token": r.token}
                        for r in b.records]}


def _result_json(r: AuditResult) -> dict:
    return {"auditor": r.auditor, "round": r.round, "session": r.session, "step": r.step, "ok": r.ok,
            "reason": r.reason, "max_row_rel_l2": r.max_row_rel_l2, "outside_share": r.outside_share,
            "audit_backend": r.audit_backend, "signature": r.signature.hex()}


def flag_json(f: Flag) -> str:
    return json.dumps(f.evidence)
