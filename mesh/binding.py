"""Bind every remote message to its authenticated sender (sans-IO).

The actor runtime hands each handler the node id the link's handshake authenticated
(`ctx.peer`; None for a message sent on this node). A message's own fields (a node id,
a term, a coordinator) are claims the remote chose; `refusal` says why a message is not
to be believed given who sent it and what this node knows, or None to accept it.

- Coordinator-only messages (PlanUpdate, PlanReady, NodeFlagged, Summary) come only from
  the coordinator elected for exactly their term.
- StageReady speaks only about its sender; a Forward's `sender` field is its sender, and
  on a plan this node knows, a stage past the first takes Forwards only from the stage
  before it; a TokenOut comes only from the last stage of the plan.
- Verification speaks only for its sender: a CommitBatch's `node`, every result in an
  AuditReport (its `auditor`) and a WireFault's `reporter` are the peer; a WireFault is
  about the current plan and comes from a stage about the node before it; an AuditRequest
  comes only from the coordinator. (The ledger then ties each result to the auditor it
  assigned, so no one reports in another auditor's name.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh.pipeline.messages import Forward, PlanReady, PlanUpdate, StageReady, TokenOut
from mesh.verify.messages import AuditReport, AuditRequest, CommitBatch, NodeFlagged, Summary, WireFault

COORDINATOR_ONLY = (PlanUpdate, PlanReady, NodeFlagged, Summary)


@dataclass(frozen=True, slots=True)
class View:
    """What the receiving node knows: itself, the current term and its coordinator, its plan."""

    node_id: str
    term: int
    coordinator: str | None
    plan: PlanUpdate | None


def _wire_fault_refusal(msg: WireFault, peer: str, plan: PlanUpdate | None) -> str | None:
    """A wire fault is evidence only from the stage that received the bytes, on the
    current plan, about the node that sends it Forwards: the stage before it (for the
    head, the serving node, which any member may be)."""
    if plan is None or (plan.term, plan.version) != (msg.term, msg.version):
        return f"WireFault on plan {msg.term}.{msg.version}, not the current plan"
    mine = [s.index for s in plan.stages if s.node == peer]
    if not mine:
        return f"WireFault from {peer}, which holds no stage"
    if min(mine) > 0 and msg.sender not in {s.node for s in plan.stages if s.index == min(mine) - 1}:
        return f"WireFault from {peer} about {msg.sender}, which is not the stage before it"
    return None


def refusal(msg: Any, peer: str | None, view: View) -> str | None:
    """Why `msg` from authenticated `peer` is refused, or None to accept it."""
    if peer is None:  # sent on this node
        return None
    if isinstance(msg, COORDINATOR_ONLY):
        if view.coordinator is None or peer != view.coordinator:
            return f"coordinator-only message from {peer}, not the coordinator ({view.coordinator})"
        if msg.term != view.term:
            return f"term {msg.term} is not the coordinator's term {view.term}"
        if isinstance(msg, PlanUpdate) and msg.coordinator != peer:
            return f"plan names coordinator {msg.coordinator}, sent by {peer}"
        return None
    if isinstance(msg, StageReady):
        return None if msg.node == peer else f"StageReady for {msg.node} sent by {peer}"
    if isinstance(msg, CommitBatch):
        return None if msg.node == peer else f"CommitBatch of {msg.node} sent by {peer}"
    if isinstance(msg, WireFault):
        if msg.reporter != peer:
            return f"WireFault reported by {msg.reporter}, sent by {peer}"
        return _wire_fault_refusal(msg, peer, view.plan)
    if isinstance(msg, AuditReport):
        other = next((r.auditor for r in msg.results if r.auditor != peer), None)
        return None if other is None else f"AuditReport with a result of {other}, sent by {peer}"
    if isinstance(msg, AuditRequest):
        if view.coordinator is None or peer != view.coordinator:
            return f"AuditRequest from {peer}, not the coordinator ({view.coordinator})"
        return None
    plan = view.plan
    if isinstance(msg, Forward):
        if msg.sender != peer:
            return f"Forward claims sender {msg.sender}, sent by {peer}"
        if plan is not None and (plan.term, plan.version) == (msg.term, msg.version):
            mine = [s.index for s in plan.stages if s.node == view.node_id]
            if mine and min(mine) > 0:
                prev = {s.node for s in plan.stages if s.index == min(mine) - 1}
                if peer not in prev:
                    return f"Forward from {peer}, not the previous stage"
        return None
    if isinstance(msg, TokenOut):
        if plan is None or not plan.stages:
            return f"TokenOut from {peer} with no plan"
        last = max(s.index for s in plan.stages)
        if peer not in {s.node for s in plan.stages if s.index == last}:
            return f"TokenOut from {peer}, not the last stage"
        return None
    return None
