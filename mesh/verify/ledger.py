"""The coordinator's side of verification: the commitment log, the chain links, the
audit schedule, escalation and flags. No I/O: it takes messages and calls ``send``.

Audit selection uses a beacon secret drawn when the coordinator takes office and
never sent to a stage: a step is audited when BLAKE3(secret, leaf) < rate, which no
stage can predict before it signs the leaf. (Publishing BLAKE3(secret) at take-office
and the secret at step-down would let anyone re-check the schedule afterwards.)

Strikes: everything a stage controls about its commitments is judged here, and each
fault is charged to the node whose signature is on the wrong side.
- A chain link. Every Forward between stages carries its sender's signature on its
  digest, and the receiver's record of that step carries the signature (its batch names
  the sender's key). A receiver record whose signature does not check is the receiver's
  strike (``unsigned-input``: it commits to an input it cannot show it was sent). A valid
  one is a debt of the sender: within COMMIT_DEADLINE_S its own signed records must
  commit that digest as the step's output. If they commit another one, it signed two
  different outputs for one step (``broken-link``); if none, it withheld the step
  (``missing-commitment``). A stage's records of a session arrive in the order it made
  them and its step numbers never go down in a plan, so a debt is judged at once when a
  record of a later step of the sender is in, and at the deadline otherwise (a stage
  that sends nothing more). The first stage's ring steps (the last stage's token coming
  back) owe the last stage's record of the step before in the same way, without a
  signature yet (the token path is not signed).
- A stage's own records of a session this log holds from its start: a first record past
  position 0 (``no-prefill``), or one whose position does not follow its step's
  predecessor (``gap``). A batch that fails verification for the current plan is its
  node's strike (``malformed``). A batch of an earlier plan of the term pays only that
  plan's debts (an honest stage flushes them after a re-plan) and is never audited, so a
  stage that signs current steps under a stale version still owes them
  (``missing-commitment``).
- Each (kind, session, step) counts once; a node with ``strike_limit`` (2) strikes in a
  term is flagged, its strikes and the signed records behind them as the evidence.
- Audits that the audited node's fetch answer spoils are failed audits (the auditor
  decides: mesh/verify/auditor.py) and escalate like any other failure.

COMMIT_DEADLINE_S, and why an honest slow node meets it: an honest stage signs its record
of a step before the next stage can even receive the step (the record is made right after
the send), and sends it within ``flush_s`` (1 s, on a timer) of signing. The evidence is
the next stage's record, made only after that stage received and computed the step and
flushed in turn. So an honest record is due at the coordinator about 1 s after the
evidence, whatever the load on the pipeline; 10 s leaves 9 s for its event loop or its
link to stall more than the next stage's did. The coordinator's own stalls (a gap in its
ticks past STALL_S) push every deadline back by the stall: what it has not read yet may
hold the owed records.
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
from mesh.verify.commitment import CommitmentRejected, forward_signed, leaf_hash, verify_batch
from mesh.verify.messages import (
    AuditRequest,
    AuditResult,
    CommitBatch,
    StepRecord,
    WireFault,
)

log = structlog.get_logger("mesh.verify.ledger")

Send = Callable[[str, str, object], None]

COMMIT_DEADLINE_S = 10.0  # a step's record is owed this long after the evidence that it exists
STRIKE_LIMIT = 2  # strikes in a term that flag a node
PLANS_KEPT = 8  # plans of the term whose late batches still pay what they owe
STALL_S = 3.0  # ticks further apart than this: the coordinator stalled, deadlines move back


@dataclass
class _Pending:
    audit_id: int
    request: AuditRequest  # the request that holds this audit now (the escalation's, once escalated)
    step: int
    auditors: list[str]
    sent_at: float
    results: list[AuditResult] = field(default_factory=list)


@dataclass
class _Owed:
    """A step's record that ``node`` owes: output ``digest`` (None: any) of ``stage``."""

    node: str
    stage: int
    step: int
    digest: bytes | None
    deadline: float
    evidence: CommitBatch  # the batch whose record says the step exists (its JSON only if charged)


@dataclass
class Strike:
    node: str
    kind: str
    session: str
    step: int
    evidence: dict


@dataclass
class Flag:
    node: str
    reason: str
    evidence: dict


class Ledger:
    def __init__(self, node_id: str, send: Send, flag: Callable[[Flag], None], *, audit_rate: float = 0.2,
                 max_sessions: int = 256, wire_strikes: int = 2, actor: str = "verify", audit_timeout_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic, audit_seed: str | None = None,
                 strike_limit: int = STRIKE_LIMIT, commit_deadline_s: float = COMMIT_DEADLINE_S):
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
        self.strike_limit = strike_limit
        self.commit_deadline_s = commit_deadline_s
        # key -> (stage, step) -> the output digests the stage committed for it (a replayed
        # step may have two): what a receiver's signed input is checked against
        self.outputs: dict[tuple, dict[tuple[int, int], set[bytes]]] = {}
        self.owed: dict[tuple, list[_Owed]] = {}  # key -> records owed in that session
        self.partial: set[tuple] = set()  # sessions this log lost its start of (evicted, then back)
        self.evicted: OrderedDict[tuple, None] = OrderedDict()
        self.chain_strikes: dict[str, dict[tuple, Strike]] = {}  # node -> (kind, session, step) -> strike
        self.last_tick: float | None = None
        self.plans: OrderedDict[Epoch, list] = OrderedDict()  # this term's recent plans: their stages
        self.flagged: dict[str, Flag] = {}
        self.commitments = self.verified_links = self.broken_links = self.missing = 0
        self.structure_anomalies = 0  # gaps and missing prefills: counted, not struck (_structure)
        self.audits = self.audit_failures = self.rejected = self.expired = self.unauditable = 0
        self.stale = self.inconclusive = 0

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
            self.outputs.clear()
            self.owed.clear()
            self.partial.clear()
            self.evicted.clear()
            self.chain_strikes.clear()
            self.plans.clear()
            self.last_tick = None

    # -- inputs ---------------------------------------------------------------------------

    def on_batch(self, b: CommitBatch, epoch: Epoch, stages: list, members: dict[str, str]) -> None:
        """``epoch``/``stages``: the current plan; ``members``: live node -> backend."""
        if epoch.term == self.term:
            self.plans[epoch] = stages
            self.plans.move_to_end(epoch)
            while len(self.plans) > PLANS_KEPT:
                self.plans.popitem(last=False)
        current = Epoch.of(b) == epoch
        if not current:
            # a plan that is gone: nobody will audit it, but a batch of an earlier plan of this
            # term still pays the records it owes (an honest stage flushes after a re-plan)
            stages = self.plans.get(Epoch.of(b)) if b.term == self.term else None
            if stages is None:
                self.stale += 1
                return
        entry = stages[b.stage] if 0 <= b.stage < len(stages) else None
        try:
            verify_batch(b, expect_node=entry.node if entry is not None else None)
            if entry is None or (entry.start, entry.end) != (b.start, b.end):
                raise CommitmentRejected(f"batch for stage {b.stage} [{b.start}, {b.end}) is not in the plan")
            if any(r.session != b.records[0].session for r in b.records):
                raise CommitmentRejected(f"batch of {b.node} mixes sessions")
        except CommitmentRejected as exc:
            self.rejected += 1
            log.warning("commitment.rejected", node=b.node, error=str(exc))
            if b.term == self.term and b.node in {s.node for s in stages}:  # the sender is bound to the link
                first = b.records[0] if b.records else None
                self._strike(b.node, "malformed", first.session if first else "", first.step if first else -1,
                             {"error": str(exc)})
            return
        self.tick()
        if not b.records:
            return
        key = (b.term, b.version, b.records[0].session)
        if key not in self.log and key in self.evicted:
            self.partial.add(key)  # its start is gone from this log: no judgement on its structure
        by_stage = self.log.setdefault(key, {})
        self.log.move_to_end(key)
        while len(self.log) > self.max_sessions:
            old = self.log.popitem(last=False)[0]
            self.outputs.pop(old, None)
            self.owed.pop(old, None)
            self.partial.discard(old)
            self.evicted[old] = None
            while len(self.evicted) > 4 * self.max_sessions:
                self.evicted.popitem(last=False)
        steps = by_stage.setdefault(b.stage, {})
        outputs = self.outputs.setdefault(key, {})
        whole = b.term == self.term and key not in self.partial  # this log holds the session from its start
        selected = []
        for r in b.records:
            if whole:
                self._structure(b, steps, r)
            replaced = steps.get(r.step)
            steps[r.step] = (r, b)
            outputs.setdefault((b.stage, r.step), set()).add(r.output_digest)
            if replaced is not None and replaced[0] != r:  # a replayed step: auditors need the new record
                for k in [k for k in self.sent if k[:4] == (*key, b.stage)]:
                    del self.sent[k]
            self.commitments += 1
            if whole:
                self._links(key, b, r, stages)
            if current and b.node not in self.flagged and self._selected(r):
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
            if res.inconclusive:  # the auditor's own trouble (it lost what it was sent, its load failed, ...):
                # no judgement of the node; send it all next time
                self.sent.pop((b.term, b.version, res.session, b.stage, res.auditor), None)
                del self.pending[res.audit_id]
                self.inconclusive += 1
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

    def tick(self) -> None:
        """Judge the records owed past their deadline (called on every batch and on a timer)."""
        self._expire()
        now = self.clock()
        if self.last_tick is not None and now - self.last_tick > STALL_S:
            stall = now - self.last_tick  # we stalled: what we have not read yet may hold them
            for owed in self.owed.values():
                for o in owed:
                    o.deadline += stall
        self.last_tick = now
        for key in list(self.owed):
            owed = self.owed[key]
            due = [o for o in owed if o.deadline <= now]
            if not due:
                continue
            self.owed[key] = [o for o in owed if o.deadline > now]
            for o in due:
                self._judge(key, o)

    def _judge(self, key: tuple, o: _Owed) -> None:
        """``o`` will not be paid: charge its node."""
        committed = self.outputs.get(key, {}).get((o.stage, o.step), set())
        if committed and o.digest is not None:
            self.broken_links += 1
            log.warning("chain.broken", node=o.node, session=key[2], step=o.step, stage=o.stage)
            self._strike(o.node, "broken-link", key[2], o.step,
                         {**_owed_json(o), "committed": sorted(d.hex() for d in committed),
                          "committed_by": self._batch_of(key, o.stage, o.step)})
        elif not committed:
            self.missing += 1
            log.warning("commitment.missing", node=o.node, session=key[2], step=o.step, stage=o.stage)
            if o.digest is None:
                # a ring step: the head's own record says a token came back, but nobody signed
                # it (the token path is not signed yet), so a rogue head could make it up
                return
            self._strike(o.node, "missing-commitment", key[2], o.step, _owed_json(o))

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

    def _structure(self, b: CommitBatch, steps: dict, r: StepRecord) -> None:
        """A stage's records of a session from its start: the prefill first, then each step
        at the position where its predecessor ended (a replay restarts at position 0).

        Counted and logged, not a strike: a stage does not choose its positions, its input
        does (the serving node's Forward at the head, the stage before's signed one later),
        so a rogue serving node or upstream stage could make every honest stage after it
        record a gap."""
        if r.start_pos == 0:
            return
        before = steps.get(r.step - 1)
        if before is None or before[0].start_pos + before[0].length != r.start_pos:
            self.structure_anomalies += 1
            log.warning("commitment.structure", node=b.node, session=r.session, step=r.step, start_pos=r.start_pos,
                        kind="no-prefill" if not steps else "gap")

    def _links(self, key: tuple, b: CommitBatch, r: StepRecord, stages: list) -> None:
        """The chain links of record ``r`` of batch ``b``: what it owes, what it pays. What
        is owed is judged at its deadline (`tick`)."""
        n, stage, outputs = len(stages), b.stage, self.outputs[key]
        owed = self.owed.setdefault(key, [])
        # as a sender: its record pays what the next stage's signed inputs (or the ring) said it sent
        for o in [o for o in owed if o.stage == stage and o.step == r.step and o.digest in (None, r.output_digest)]:
            owed.remove(o)
            self.verified_links += 1
        deadline = self.clock() + self.commit_deadline_s
        if stage > 0:  # as a receiver: the stage before signed what it sent
            sender = stages[stage - 1].node
            if not forward_signed(b.upstream_key, r.input_signature, b.term, b.version, r.session, r.step,
                                  r.start_pos, sender, r.input_digest):
                self._strike(b.node, "unsigned-input", r.session, r.step, {"batch": _batch_json(b)})
            elif r.input_digest in outputs.get((stage - 1, r.step), ()):
                self.verified_links += 1
            else:
                self._owe(key, _Owed(sender, stage - 1, r.step, r.input_digest, deadline, b))
        elif n > 1 and r.step > 0 and r.start_pos > 0:  # a ring step: the last stage sampled the step before
            if outputs.get((n - 1, r.step - 1)):
                self.verified_links += 1
            else:
                self._owe(key, _Owed(stages[n - 1].node, n - 1, r.step - 1, None, deadline, b))

    def _owe(self, key: tuple, o: _Owed) -> None:
        # judged at its deadline only, never early on "a later record is in": an honest
        # stage's batches can arrive out of order (one re-sent after a failed send), and a
        # replay re-runs a step whose new record may still be on its way
        self.owed[key].append(o)

    def _batch_of(self, key: tuple, stage: int, step: int) -> dict | None:
        held = self.log.get(key, {}).get(stage, {}).get(step)
        return _batch_json(held[1]) if held is not None else None

    def _strike(self, node: str, kind: str, session: str, step: int, evidence: dict) -> None:
        if node in self.flagged:
            return
        strikes = self.chain_strikes.setdefault(node, {})
        if (kind, session, step) in strikes:
            return
        strikes[(kind, session, step)] = Strike(node, kind, session, step, evidence)
        log.warning("verify.strike", node=node, kind=kind, session=session, step=step, strikes=len(strikes))
        if len(strikes) >= self.strike_limit:
            kinds = sorted({s.kind for s in strikes.values()})
            self._flag(node, f"{len(strikes)} strikes: {', '.join(kinds)}",
                       {"strikes": [{"kind": s.kind, "session": s.session, "step": s.step, **s.evidence}
                                    for s in strikes.values()]})

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


def _owed_json(o: _Owed) -> dict:
    return {"owed_by": o.node, "stage": o.stage, "owed_step": o.step, "digest": o.digest.hex() if o.digest else None,
            "batch": _batch_json(o.evidence)}


def _batch_json(b: CommitBatch) -> dict:
    return {"term": b.term, "version": b.version, "stage": b.stage, "layers": [b.start, b.end], "node": b.node,
            "public_key": b.public_key.hex(), "backend": b.backend, "weight_mode": b.weight_mode,
            "weights_digest": b.weights_digest.hex(), "root": b.root.hex(), "signature": b.signature.hex(),
            "upstream_key": b.upstream_key.hex(),
            "records": [{"session": r.session, "step": r.step, "start_pos": r.start_pos, "length": r.length,
                         "input": r.input_digest.hex(), "output": r.output_digest.hex(), "token": r.token,
                         "input_signature": r.input_signature.hex()}
                        for r in b.records]}


def _result_json(r: AuditResult) -> dict:
    return {"auditor": r.auditor, "round": r.round, "session": r.session, "step": r.step, "ok": r.ok,
            "reason": r.reason, "max_row_rel_l2": r.max_row_rel_l2, "outside_share": r.outside_share,
            "audit_backend": r.audit_backend, "signature": r.signature.hex()}


def flag_json(f: Flag) -> str:
    return json.dumps(f.evidence)
