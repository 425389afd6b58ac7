"""Verification on one Node: the stage recorder, the auditor, and — while this node
coordinates — the ledger. Messages arrive on the node's ``verify`` actor (the node
routes them to `VerifyService.handlers`)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from actors.clock import LOOP_CLOCK, Clock
from actors.identity import NodeIdentity
from kernels.stage import StageSpec
from mesh.pipeline.coordinator import CoordinatorRole
from mesh.pipeline.plan import Epoch
from mesh.pipeline.stage_host import StageObserver
from mesh.verify import auditor
from mesh.verify.auditor import Auditor
from mesh.testing.faults import parse_fault
from mesh.verify.ledger import Flag, Ledger, auditor_order
from mesh.verify.messages import (
    AuditData,
    AuditFetch,
    AuditReport,
    AuditRequest,
    CommitBatch,
    NodeFlagged,
    Summary,
    WireFault,
)
from mesh.verify.recorder import RETAIN_BYTES, VERIFY_ACTOR, StageRecorder
from mesh.verify.warrant import sign_warrant, warrant_refusal

log = structlog.get_logger("mesh.verify")
# The coordinator sends its counters to the other nodes (for their `mesh status`) at most
# this often: every send is an encrypted message on the event loops that carry the tokens.
PUBLISH_S = 1.0
# How often the recorder sends the chunks that waited flush_s, and the ledger judges the
# records owed past their deadline.
TICK_S = 0.5

Send = Callable[[str, str, object], None]
Ask = Callable[[str, str, object, float], Awaitable[Any]]


@dataclass(frozen=True)
class VerifyConfig:
    """Verification's settings (NodeConfig.verify). `from_env` reads the MESH_* variables
    the benches set on node processes; it is called in one place, by `mesh join`."""

    enabled: bool = True  # False: no commitments, no audits (bench/verify.py's baseline)
    audit_rate: float = 0.2  # share of stage steps audited
    gather_s: float = auditor.GATHER_S
    defer_s: float = auditor.DEFER_S
    retain_mb: float = RETAIN_BYTES / 2 ** 20
    audit_seed: str | None = None  # tests and benches only: a reproducible audit schedule
    fault: str | None = None  # test-only misbehaviour, mesh.testing.faults spec

    @classmethod
    def from_env(cls, env: dict[str, str], **overrides: Any) -> "VerifyConfig":
        base = cls(enabled=env.get("MESH_VERIFY") != "off",
                   gather_s=float(env.get("MESH_AUDIT_GATHER_S", auditor.GATHER_S)),
                   defer_s=float(env.get("MESH_AUDIT_DEFER_S", auditor.DEFER_S)),
                   retain_mb=float(env.get("MESH_VERIFY_RETAIN_MB", RETAIN_BYTES / 2 ** 20)),
                   audit_seed=env.get("MESH_AUDIT_SEED"))
        return dataclasses.replace(base, **overrides)

    @property
    def auditing(self) -> bool:
        return self.enabled and self.audit_rate > 0


class VerifyService:
    """Given what it needs as callables: ``send(node, actor, msg)``, ``ask(node, actor,
    msg, timeout)``, the cluster's ``coordinator()``, the live ``members()`` (node ->
    backend), this node's coordinator role (verification's ledger lives while it holds
    office; a flag evicts through it) and ``stage_idle_s()``."""

    def __init__(self, identity: NodeIdentity, model_path: Path, *, backend: str, weight_mode: str,
                 send: Send, ask: Ask, coordinator: Callable[[], str | None], members: Callable[[], dict[str, str]],
                 role: CoordinatorRole, stage_idle_s: Callable[[], float], config: VerifyConfig = VerifyConfig(),
                 clock: Clock = LOOP_CLOCK, audit_compute: Any = None):
        self.node_id = identity.node_id
        self.identity = identity
        self.config = config
        self.send = send
        self.ask = ask
        self.coordinator = coordinator
        self.members = members
        self.role = role
        self.clock = clock
        self.weight_mode = weight_mode
        fault = parse_fault(config.fault) if config.fault else None
        self.recorder = StageRecorder(identity, send, coordinator, backend=backend, weight_mode=weight_mode,
                                      fault=fault, retain_bytes=int(config.retain_mb * 2 ** 20), clock=clock.now)
        self.ledger = Ledger(self.node_id, self._send_assignment, self._on_flag, audit_rate=config.audit_rate,
                             actor=VERIFY_ACTOR, clock=clock.now, audit_seed=config.audit_seed)
        self.auditor = Auditor(identity, model_path, backend, self._fetch, self._report, gather_s=config.gather_s,
                               defer_s=config.defer_s, stage_idle_s=stage_idle_s, clock=clock,
                               compute=audit_compute)
        self.flags: dict[str, dict] = {}
        self.summary = Summary(0, 0, 0, 0, 0, 0, 0)
        self._publish_handle: asyncio.TimerHandle | None = None
        self._tick_handle: asyncio.TimerHandle | None = None

    @property
    def observer(self) -> StageObserver | None:
        """What watches this node's stage: the recorder, or nothing when verification is off."""
        return self.recorder if self.config.enabled else None

    def handlers(self) -> dict:
        return {CommitBatch: self._on_batch, AuditRequest: self._on_request, AuditFetch: self.recorder.fetch,
                AuditReport: self._on_report, WireFault: self._on_wire_fault, NodeFlagged: self._on_flagged,
                Summary: self._on_summary}

    def close(self) -> None:
        if self._publish_handle is not None:
            self._publish_handle.cancel()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        self.auditor.close()

    def verification(self) -> dict:
        # the coordinator reports its ledger as it is; the others the last summary it sent
        role = self.role
        s = self._summary() if role.active and self.ledger.term == role.term else self.summary
        return {"commitments": s.commitments, "verified_links": s.verified_links, "broken_links": s.broken_links,
                "audits": s.audits, "audit_failures": s.audit_failures, "audits_pending": s.audits_pending,
                "strikes": s.strikes, "missing_commitments": s.missing,
                "flagged_nodes": list(self.flags.values()),
                "local": {"commitments": self.recorder.commitments, "batches": self.recorder.batches,
                          "audits_run": self.auditor.audits, "audit_passes": self.auditor.passes,
                          "audit_compute_s": round(self.auditor.compute_s, 3), "wire_faults_seen": self.recorder.wire_faults_seen,
                          "commit_us": round(self.recorder.commit_s * 1e6, 1),
                          # committed outputs kept for auditors, and those the byte budget dropped early
                          "retained_mb": round(self.recorder.kept_bytes / 2 ** 20, 1),
                          "retention_dropped": self.recorder.dropped_young}}

    # -- coordinator side -------------------------------------------------------------------

    def _ledger(self) -> Ledger | None:
        role = self.role
        if not role.active or role.current is None:
            return None
        self.ledger.take_office(role.term)
        return self.ledger

    def _on_batch(self, batch: CommitBatch) -> None:
        ledger = self._ledger()
        if ledger is not None:
            rec = self.role.current
            ledger.on_batch(batch, rec.epoch, rec.update.stages, self.members())
            self._publish_soon()

    def _on_report(self, report: AuditReport) -> None:
        ledger = self._ledger()
        if ledger is not None:
            ledger.on_results(report.results, self.members())
            self._publish_soon()

    def _on_wire_fault(self, report: WireFault) -> None:
        ledger = self._ledger()
        if ledger is not None:
            ledger.on_wire_fault(report)

    def _send_assignment(self, node: str, actor: str, msg: object) -> bool:
        """The ledger's sends: an audit request goes with this coordinator's warrant for its
        auditor, which the audited node checks instead of its own, maybe stale, member list."""
        if isinstance(msg, AuditRequest):
            msg = dataclasses.replace(msg, warrant=sign_warrant(self.identity, msg, node))
        return self.send(node, actor, msg)

    def _on_flag(self, flag: Flag) -> None:
        msg = NodeFlagged(self.role.term, flag.node, flag.reason, json.dumps(flag.evidence))
        self._on_flagged(msg)
        for member in self.members():
            if member != self.node_id:
                self.send(member, VERIFY_ACTOR, msg)
        self._publish()

    def _publish_soon(self) -> None:
        if self._publish_handle is None:
            self._publish_handle = self.clock.call_later(PUBLISH_S, self._publish)

    def _publish(self) -> None:
        self._publish_handle = None
        summary = self._summary()
        if summary == self.summary:
            return
        self.summary = summary
        for member in self.members():
            if member != self.node_id:
                self.send(member, VERIFY_ACTOR, self.summary)

    def _summary(self) -> Summary:
        ledger = self.ledger
        return Summary(ledger.term, ledger.commitments, ledger.verified_links, ledger.broken_links,
                       ledger.audits, ledger.audit_failures, len(ledger.pending),
                       sum(len(v) for v in ledger.chain_strikes.values()), ledger.missing)

    # -- every node -------------------------------------------------------------------------

    def _on_summary(self, summary: Summary) -> None:
        if summary.term >= self.summary.term:
            self.summary = summary

    def _on_flagged(self, msg: NodeFlagged) -> None:
        if msg.node not in self.flags:
            self.flags[msg.node] = {"node": msg.node, "reason": msg.reason, "term": msg.term, "at": self.clock.wall(),
                                    "evidence": json.loads(msg.evidence)}
            log.error("node.flagged", node=msg.node, reason=msg.reason)
        # every node remembers, so whichever node coordinates next keeps it out of the plan; the
        # coordinator re-places its layers at once, as after a failure
        self.role.evict(msg.node, f"flagged by verification: {msg.reason}")

    def start(self) -> None:
        """Called once the node runs (after it measured its speed): start the audit process."""
        if self.config.auditing:
            self.auditor.warm()
        if self.config.enabled and self._tick_handle is None:
            self._tick_handle = self.clock.call_later(TICK_S, self._tick)

    def _tick(self) -> None:
        self._tick_handle = self.clock.call_later(TICK_S, self._tick)
        self.recorder.flush_due()
        role = self.role
        if role.active and role.current is not None and self.ledger.term == role.term:
            self.ledger.tick()
            self._publish_soon()

    def on_plan_ready(self, plan) -> None:
        """Load the stages this node is first or second choice to audit, so an audit (and
        its escalation) never waits for a load."""
        if not self.config.auditing:
            return
        members, me, n = self.members(), self.node_id, len(plan.stages)
        mine = []  # (choice, stage): the stages this node audits first come first (loads run in turn)
        for entry in plan.stages:
            order = self._auditors(entry.index, entry.node, entry.backend, members)
            if entry.node != me and me in order:
                mine.append((order.index(me), entry.index, entry))
        for _, _, entry in sorted(mine, key=lambda m: m[:2]):
            spec = StageSpec(entry.start, entry.end, embed=entry.index == 0, head=entry.index == n - 1)
            self.auditor.preload(spec, entry.backend, self.weight_mode)

    def _auditors(self, stage: int, node: str, backend: str, members: dict[str, str]) -> list[str]:
        """Who audits ``stage`` as ``node`` holds it: the first audit's auditor and its
        escalation's (the ledger picks them so)."""
        return auditor_order(stage, node, backend, members, set(self.flags))[:2]

    def fetchers(self, req: AuditFetch, peer: str | None = None) -> list[str] | None:
        """The nodes that may fetch what ``req`` (from ``peer``) asks of this node: the
        auditor the coordinator's warrant names, else the auditors of the stage that
        committed those steps as this node computes them; None if it holds none of them."""
        entry = self.recorder.stage_of(req.session, Epoch.of(req))
        if entry is None:
            return None
        if peer is not None and warrant_refusal(req, peer, self.node_id, entry.index, self.coordinator()) is None:
            return [peer]
        # the backend the commitments name (the ledger orders the auditors by it)
        return self._auditors(entry.index, self.node_id, self.recorder.backend, self.members())

    def _on_request(self, req: AuditRequest) -> None:
        coordinator = self.coordinator()
        if coordinator is not None:
            self.auditor.on_request(req, coordinator)

    async def _fetch(self, node: str, req: AuditFetch) -> AuditData:
        return await self.ask(node, VERIFY_ACTOR, req, auditor.FETCH_TIMEOUT_S)

    def _report(self, coordinator: str, report: AuditReport) -> None:
        self.send(coordinator, VERIFY_ACTOR, report)


