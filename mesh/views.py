"""What a node shows of itself: the JSON cluster view, the API's `mesh` object and the
Prometheus metrics. Read-only: built from the node's parts, never changing them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mesh.planner import same_host_speeds

if TYPE_CHECKING:
    from mesh.node import Node


def status(node: Node) -> dict:
    from mesh.node import placeable

    cluster, plan = node.cluster, node.plan.update
    members = cluster.members() if cluster is not None else []
    roles: dict[str, list[str]] = {}
    if plan is not None:
        for s in plan.stages:
            roles.setdefault(s.node, []).append(f"stage{s.index}")
    coordinator = cluster.coordinator if cluster is not None else None
    if coordinator:
        roles.setdefault(coordinator, []).append("coordinator")
    plan_speed = {c.node_id: c.speed for c in same_host_speeds(placeable(members))}
    nodes = [{
        "id": m.node_id, "name": m.name, "address": f"{m.address[0]}:{m.address[1]}" if m.address else None,
        "api_port": m.api_port, "backend": m.backend, "device": m.device, "free_memory": m.free_memory,
        "speed": m.speed, "speed_source": m.speed_source, "host": m.host_id,
        # the score the planner shares layers by: the best one measured on the node's host
        "plan_speed": plan_speed.get(m.node_id),
        "state": m.state, "member": m.member, "voter": m.voter,
        "roles": roles.get(m.node_id, []),
    } for m in members]
    plan_view = None
    if plan is not None:
        plan_view = {"term": plan.term, "version": plan.version, "ready": node.plan.ready,
                     "error": plan.error or None,
                     "stages": [{"index": s.index, "node": s.node, "layers": [s.start, s.end], "backend": s.backend}
                                for s in plan.stages]}
    return {"self": node.node_id, "name": node.info.name, "coordinator": coordinator,
            "term": cluster.term if cluster is not None else 0, "nodes": nodes, "plan": plan_view,
            "admission": {"mode": node.config.admit, "pending": list(cluster.pending()) if cluster else []},
            "model": node.model_name, "failovers": node.plan.failovers, "verification": node.verify.verification(),
            # while coordinating: the nodes out of placement for a missed load deadline, and why
            "held_out": node.coordinator.held_out_view() if node.coordinator.active else {},
            "stage": stage_stats(node)}


def stage_stats(node: Node) -> dict:
    s = node.stage_host.stats
    return {"steps": s.steps, "batches": s.batches, "tokens_sampled": s.tokens_sampled,
            "digest_mismatches": s.digest_mismatches, "retransmits": s.retransmits_sent,
            "busy_s": round(s.busy_s, 3), "compute_s": round(s.compute_s, 3),
            "cpu_s": round(s.cpu_s, 3), "runq_s": node.runner.runq_s(), "sessions": len(node.stage_host.meta)}


def mesh_info(node: Node) -> dict:
    """The `mesh` object of an API response: who computed the answer."""
    plan, cluster = node.plan.update, node.cluster
    pipeline = [] if plan is None else [
        {"node": s.node, "layers": [s.start, s.end], "backend": s.backend} for s in plan.stages]
    return {"node": node.node_id, "coordinator": cluster.coordinator if cluster else None,
            "term": cluster.term if cluster else 0, "pipeline": pipeline,
            "verification": node.verify.verification(), "failovers": node.plan.failovers}


def metrics_text(node: Node) -> str:
    s, serving, v = node.stage_host.stats, node.serving, node.verify.verification()
    samples = [
        ("mesh_tokens_served_total", "counter", serving.tokens_out),
        ("mesh_sessions_completed_total", "counter", serving.completed),
        ("mesh_sessions_active", "gauge", len(serving.sessions)),
        ("mesh_stage_steps_total", "counter", s.steps),
        ("mesh_stage_batches_total", "counter", s.batches),
        ("mesh_stage_busy_seconds_total", "counter", f"{s.busy_s:.6f}"),
        ("mesh_tokens_sampled_total", "counter", s.tokens_sampled),
        ("mesh_digest_mismatches_total", "counter", s.digest_mismatches),
        ("mesh_failovers_total", "counter", len(node.plan.failovers)),
        ("mesh_term", "gauge", node.cluster.term if node.cluster else 0),
        ("mesh_is_coordinator", "gauge", int(node.coordinator.active)),
        ("mesh_audits_total", "counter", v["audits"]),
        ("mesh_audit_failures_total", "counter", v["audit_failures"]),
    ]
    lines = []
    for name, kind, value in samples:
        lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
