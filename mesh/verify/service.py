"""Verification on one Node: the stage recorder, the auditor, and — while this node
coordinates — the ledger. Messages arrive on the node's ``verify`` actor."""

from __future__ import annotations

import asyncio
import json
import os
import time

import structlog

from kernels.stage import StageSpec
from mesh.verify.auditor import Auditor
from mesh.verify.faults import Fault
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
from mesh.verify.recorder import VERIFY_ACTOR, StageRecorder

log = structlog.get_logger("mesh.verify")
# The coordinator sends its counters to the other nodes (for their `mesh status`) at most
# this often: every send is an encrypted message on the event loops that carry the tokens.
PUBLISH_S = 1.0


class VerifyService:
    def __init__(self, node, *, audit_rate: float = 0.2, fault: Fault | None = None):
        self.node = node
        self.recorder = StageRecorder(node.identity, node._send, self._coordinator, fault=fault)
        self.ledger = Ledger(node.node_id, node._send, self._on_flag, audit_rate=audit_rate, actor=VERIFY_ACTOR)
        self.auditor = Auditor(node.identity, node.model_path, node.backend, self._fetch, self._report,
                               stage_idle_s=lambda: time.monotonic() - node.stage_host.stats.last_step_at)
        self.flags: dict[str, dict] = {}
        self.summary = Summary(0, 0, 0, 0, 0, 0, 0)
        self._publish_handle: asyncio.TimerHandle | None = None

    def handlers(self) -> dict:
        return {CommitBatch: self._on_batch, AuditRequest: self._on_request, AuditFetch: self.recorder.fetch,
                AuditReport: self._on_report, WireFault: self._on_wire_fault, NodeFlagged: self._on_flagged,
                Summary: self._on_summary}

    def close(self) -> None:
        if self._publish_handle is not None:
            self._publish_handle.cancel()
        self.auditor.close()

    def verification(self) -> dict:
        # the coordinator reports its ledger as it is; the others the last summary it sent
        role = self.node.coordinator
        s = self._summary() if role.active and self.ledger.term == role.term else self.summary
        return {"commitments": s.commitments, "verified_links": s.verified_links, "broken_links": s.broken_links,
                "audits": s.audits, "audit_failures": s.audit_failures, "audits_pending": s.audits_pending,
                "flagged_nodes": list(self.flags.values()),
                "local": {"commitments": self.recorder.commitments, "batches": self.recorder.batches,
                          "audits_run": self.auditor.audits, "audit_passes": self.auditor.passes,
                          "audit_compute_s": round(self.auditor.compute_s, 3), "wire_faults_seen": self.recorder.wire_faults_seen,
                          "commit_us": round(self.recorder.commit_s * 1e6, 1),
                          # committed outputs kept for auditors, and those the byte budget dropped early
                          "retained_mb": round(self.recorder.kept_bytes / 2 ** 20, 1),
                          "retention_dropped": self.recorder.dropped_young}}

    # -- coordinator side -------------------------------------------------------------------

    def _coordinator(self) -> str | None:
        return self.node.cluster.coordinator if self.node.cluster is not None else None

    def _ledger(self) -> Ledger | None:
        role = self.node.coordinator
        if not role.active or role.current is None:
            return None
        self.ledger.take_office(role.term)
        return self.ledger

    def _members(self) -> dict[str, str]:
        return {c.node_id: c.backend for c in self.node._capacities()}

    def _on_batch(self, batch: CommitBatch) -> None:
        ledger = self._ledger()
        if ledger is not None:
            rec = self.node.coordinator.current
            ledger.on_batch(batch, rec.epoch, rec.update.stages, self._members())
            self._publish_soon()

    def _on_report(self, report: AuditReport) -> None:
        ledger = self._ledger()
        if ledger is not None:
            ledger.on_results(report.results, self._members())
            self._publish_soon()

    def _on_wire_fault(self, report: WireFault) -> None:
        ledger = self._ledger()
        if ledger is not None:
            ledger.on_wire_fault(report)

    def _on_flag(self, flag: Flag) -> None:
        msg = NodeFlagged(self.node.coordinator.term, flag.node, flag.reason, json.dumps(flag.evidence))
        self._on_flagged(msg)
        for member in self._members():
            if member != self.node.node_id:
                self.node._send(member, VERIFY_ACTOR, msg)
        self._publish()

    def _publish_soon(self) -> None:
        if self._publish_handle is None:
            self._publish_handle = asyncio.get_running_loop().call_later(PUBLISH_S, self._publish)

    def _publish(self) -> None:
        self._publish_handle = None
        summary = self._summary()
        if summary == self.summary:
            return
        self.summary = summary
        for member in self._members():
            if member != self.node.node_id:
                self.node._send(member, VERIFY_ACTOR, self.summary)

    def _summary(self) -> Summary:
        ledger = self.ledger
        return Summary(ledger.term, ledger.commitments, ledger.verified_links, ledger.broken_links,
                       ledger.audits, ledger.audit_failures, len(ledger.pending))

    # -- every node -------------------------------------------------------------------------

    def _on_summary(self, summary: Summary) -> None:
        if summary.term >= self.summary.term:
            self.summary = summary

    def _on_flagged(self, msg: NodeFlagged) -> None:
        if msg.node not in self.flags:
            self.flags[msg.node] = {"node": msg.node, "reason": msg.reason, "term": msg.term, "at": time.time(),
                                    "evidence": json.loads(msg.evidence)}
            log.error("node.flagged", node=msg.node, reason=msg.reason)
        # every node remembers, so whichever node coordinates next keeps it out of the plan; the
        # coordinator re-places its layers at once, as after a failure
        self.node.coordinator.evict(msg.node, f"flagged by verification: {msg.reason}")

    def start(self) -> None:
        """Called once the node runs (after it measured its speed): start the audit process."""
        if os.environ.get("MESH_VERIFY") != "off" and self.ledger.audit_rate > 0:
            self.auditor.warm()

    def on_plan_ready(self, plan) -> None:
        """Load the stages this node is first or second choice to audit, so an audit (and
        its escalation) never waits for a load."""
        if os.environ.get("MESH_VERIFY") == "off" or self.ledger.audit_rate <= 0:
            return
        members, me, n = self._members(), self.node.node_id, len(plan.stages)
        mine = []  # (choice, stage): the stages this node audits first come first (loads run in turn)
        for entry in plan.stages:
            order = auditor_order(entry.index, entry.node, entry.backend, members, set(self.flags))[:2]
            if entry.node != me and me in order:
                mine.append((order.index(me), entry.index, entry))
        for _, _, entry in sorted(mine, key=lambda m: m[:2]):
            spec = StageSpec(entry.start, entry.end, embed=entry.index == 0, head=entry.index == n - 1)
            self.auditor.preload(spec, entry.backend, self.node.stage_host.weight_mode)

    def _on_request(self, req: AuditRequest) -> None:
        coordinator = self._coordinator()
        if coordinator is not None:
            self.auditor.on_request(req, coordinator)

    async def _fetch(self, node: str, req: AuditFetch) -> AuditData:
        return await self.node.system.ref(node, VERIFY_ACTOR).ask(req, timeout=15.0)

    def _report(self, coordinator: str, report: AuditReport) -> None:
        self.node._send(coordinator, VERIFY_ACTOR, report)


def attach(node, *, audit_rate: float, fault_spec: str | None) -> VerifyService:
    """Build the node's verification and hook it into its stage host; returns the handlers' owner."""
    from mesh.verify.faults import parse_fault

    fault = parse_fault(fault_spec) if fault_spec else None
    service = VerifyService(node, audit_rate=audit_rate, fault=fault)
    host = node.stage_host
    node.system.spawn(node._inbox(service.handlers()), name=VERIFY_ACTOR, mailbox_size=10_000)
    if os.environ.get("MESH_VERIFY") == "off":  # bench/verify.py's baseline: no commitments, no audits
        return service

    host.verifier = service.recorder
    if fault is not None and fault.kind == "corrupt-wire":
        host.wire_fault = lambda tensor: service.recorder.wire(host, tensor)
    return service
