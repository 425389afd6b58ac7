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
  assigned, so no one reports in another auditor's name.) At the head, the node a
  WireFault accuses must be the session's serving node, as this node knows it: a head
  cannot blame anyone for a session the judge knows no serving node of (a made-up id).
- An AuditFetch comes only from an auditor the audit schedule picks for the stage that
  committed those steps (`auditor_order`'s first two: the first audit and its
  escalation): no other member reads a stage's inputs (stage 0's: the prompt).
- StepLost and SessionFailed come only from a stage of the plan at their epoch; a
  Retransmit only from the stage after this node's (or, to its serving side, the head).
  At the head, a prefill's `meta.serve_node` is its sender: the tokens go to whoever
  sent the prompt.

EndSession is bound where the session is known, in `StageHost.on_end`: only the stage
host knows a session's serving node, and for a session whose prefill has not arrived yet
(the end overtook it) it must remember who ended it until the prefill says who serves it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from mesh.pipeline.messages import (
    Forward,
    PlanReady,
    PlanUpdate,
    Retransmit,
    SessionFailed,
    StageReady,
    StepLost,
    TokenOut,
)
from mesh.verify.messages import AuditFetch, AuditReport, AuditRequest, CommitBatch, NodeFlagged, Summary, WireFault

COORDINATOR_ONLY = (PlanUpdate, PlanReady, NodeFlagged, Summary)


def _unknown(_: Any) -> None:
    return None


@dataclass(frozen=True, slots=True)
class View:
    """What the receiving node knows: itself, the current term and its coordinator, its
    plan; and, asked only for the messages that need them (a View is built per message):
    ``fetchers(fetch)``, the nodes that may fetch what ``fetch`` asks for (None: this
    node holds no such steps), and ``serve_node(session)``, the node serving a session
    (None: not known here)."""

    node_id: str
    term: int
    coordinator: str | None
    plan: PlanUpdate | None
    fetchers: Callable[[AuditFetch], Collection[str] | None] = _unknown
    serve_node: Callable[[str], str | None] = _unknown


def _on_plan(msg: Any, plan: PlanUpdate | None) -> bool:
    return plan is not None and (plan.term, plan.version) == (msg.term, msg.version)


def _indices(plan: PlanUpdate, node: str) -> list[int]:
    return [s.index for s in plan.stages if s.node == node]


def _holders(plan: PlanUpdate, index: int) -> set[str]:
    return {s.node for s in plan.stages if s.index == index}


def _wire_fault_refusal(msg: WireFault, peer: str, view: View) -> str | None:
    """A wire fault is evidence only from the stage that received the bytes, on the
    current plan, about the node that sends it Forwards: the stage before it (for the
    head, the serving node, which any member may be: the session's, which this node
    must know)."""
    plan = view.plan
    if not _on_plan(msg, plan):
        return f"WireFault on plan {msg.term}.{msg.version}, not the current plan"
    mine = _indices(plan, peer)
    if not mine:
        return f"WireFault from {peer}, which holds no stage"
    if min(mine) > 0 and msg.sender not in _holders(plan, min(mine) - 1):
        return f"WireFault from {peer} about {msg.sender}, which is not the stage before it"
    if min(mine) == 0:
        # the head takes its prefills from any serving node: it may accuse only the serving
        # node of a session this node (the judge) knows, never one of a made-up session
        serving = view.serve_node(msg.session)
        if serving is None:
            return f"WireFault from the head {peer} about {msg.sender}: no serving node known of session {msg.session}"
        if msg.sender != serving:
            return f"WireFault from the head {peer} about {msg.sender}, but {serving} serves session {msg.session}"
    return None


def _pipeline_refusal(msg: Any, peer: str, view: View) -> str | None:
    """StepLost, SessionFailed, Retransmit: from a stage of the current plan (a
    Retransmit: the stage after this node's, or the head to this node's serving side)."""
    kind = type(msg).__name__
    plan = view.plan
    if not _on_plan(msg, plan):
        return f"{kind} on plan {msg.term}.{msg.version}, not the current plan"
    theirs = _indices(plan, peer)
    if not theirs:
        return f"{kind} from {peer}, which holds no stage"
    if isinstance(msg, Retransmit):
        mine = _indices(plan, view.node_id)
        if 0 not in theirs and not any(i - 1 in mine for i in theirs):
            return f"Retransmit from {peer}, not the stage after this node's nor the head"
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
        return _wire_fault_refusal(msg, peer, view)
    if isinstance(msg, AuditReport):
        other = next((r.auditor for r in msg.results if r.auditor != peer), None)
        return None if other is None else f"AuditReport with a result of {other}, sent by {peer}"
    if isinstance(msg, AuditRequest):
        if view.coordinator is None or peer != view.coordinator:
            return f"AuditRequest from {peer}, not the coordinator ({view.coordinator})"
        return None
    if isinstance(msg, AuditFetch):
        fetchers = view.fetchers(msg)
        if fetchers is not None and peer not in fetchers:
            return f"AuditFetch from {peer}, not an auditor of that stage ({sorted(fetchers)})"
        return None
    if isinstance(msg, (StepLost, SessionFailed, Retransmit)):
        return _pipeline_refusal(msg, peer, view)
    plan = view.plan
    if isinstance(msg, Forward):
        if msg.sender != peer:
            return f"Forward claims sender {msg.sender}, sent by {peer}"
        if _on_plan(msg, plan):
            mine = _indices(plan, view.node_id)
            if mine and min(mine) > 0 and peer not in _holders(plan, min(mine) - 1):
                return f"Forward from {peer}, not the previous stage"
            if mine and min(mine) == 0 and msg.meta is not None and msg.meta.serve_node != peer:
                return f"prefill from {peer} names {msg.meta.serve_node} as its serving node"
        return None
    if isinstance(msg, TokenOut):
        if plan is None or not plan.stages:
            return f"TokenOut from {peer} with no plan"
        last = max(s.index for s in plan.stages)
        if peer not in {s.node for s in plan.stages if s.index == last}:
            return f"TokenOut from {peer}, not the last stage"
        return None
    return None
