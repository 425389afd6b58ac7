"""Placement from measured speed, and the planner's KV reserve (pure).

`make demo` on a 2-core machine once split SmolLM2's 30 layers 28/1/1: three nodes on
one host timed a tiny matvec while the others were still starting, and contention, not
hardware, decided the plan. Nodes on one host now share by the best score measured
there; the plan reserves each layer's KV cache for the sessions it admits."""

from __future__ import annotations

from mesh.cluster.service import Member
from mesh.node import placeable
from mesh.planner import InsufficientMemory, ModelProfile, NodeCapacity, plan, same_host_speeds

MIB = 1 << 20
SMOL = ModelProfile(n_layers=30, layer_bytes=14 * MIB, embed_bytes=108 * MIB, head_bytes=27 * MIB)


def shares(p) -> list[int]:
    return [s.n_layers for s in p.stages]


def test_three_nodes_on_one_host_get_balanced_shares_whatever_contention_made_them_measure() -> None:
    # the scores of the 28/1/1 demo: the first node measured before the others started
    nodes = [NodeCapacity("a", 8 << 30, 9.1, host="h1"), NodeCapacity("b", 8 << 30, 0.4, host="h1"),
             NodeCapacity("c", 8 << 30, 0.3, host="h1")]
    layers = shares(plan(nodes, SMOL))
    assert max(layers) <= 1.5 * min(layers), layers
    assert sorted(layers) == [10, 10, 10]


def test_nodes_on_different_hosts_still_share_by_speed() -> None:
    nodes = [NodeCapacity("a", 8 << 30, 3.0, host="fast"), NodeCapacity("b", 8 << 30, 1.0, host="slow"),
             NodeCapacity("c", 8 << 30, 2.0)]  # no host stated: its own
    assert shares(plan(nodes, SMOL)) == [15, 5, 10]


def test_a_host_group_shares_by_its_best_score_against_another_host() -> None:
    nodes = [NodeCapacity("a", 8 << 30, 2.0, host="laptop"), NodeCapacity("b", 8 << 30, 0.5, host="laptop"),
             NodeCapacity("c", 8 << 30, 4.0, host="desktop")]
    assert shares(plan(nodes, SMOL)) == [8, 7, 15]


def test_a_key_claiming_an_honest_nodes_host_cannot_lower_its_score() -> None:
    honest = NodeCapacity("a", 8 << 30, 5.0, host="h1")
    rogue = NodeCapacity("r", 8 << 30, 1e-6, host="h1")
    assert {n.node_id: n.speed for n in same_host_speeds([honest, rogue])} == {"a": 5.0, "r": 5.0}


def test_placeable_carries_the_host_a_member_heartbeats() -> None:
    m = Member("a", backend="torch", free_memory=1 << 30, member=True, voter=True, speed=2.0, host_id="h1")
    assert placeable([m])[0].host == "h1"


def test_the_plan_reserves_each_layers_kv_cache() -> None:
    with_kv = ModelProfile(30, 14 * MIB, 108 * MIB, 27 * MIB, kv_bytes_per_layer=12 * MIB)
    # 400 MiB hold 27 layers of weights beside the embedding, but only 11 with their KV reserve
    small, big = NodeCapacity("a", 400 * MIB, 1.0), NodeCapacity("b", 8 << 30, 1.0)
    p = plan([small, big], with_kv)
    assert p.stages[0].node_id == "a" and p.stages[0].n_layers == (400 - 108) // 26
    try:
        plan([NodeCapacity("a", 400 * MIB, 1.0)], with_kv, max_stages=1)
    except InsufficientMemory as exc:
        assert exc.needed_bytes == 30 * 26 * MIB + 135 * MIB
    else:
        raise AssertionError("a node without room for the KV reserve was given the whole model")


def test_a_member_heartbeating_a_speed_or_memory_that_is_no_number_cannot_stop_the_plan() -> None:
    # a heartbeat is the member's claim: msgpack lets it put any value in these fields
    honest = [Member(n, backend="torch", free_memory=8 << 30, member=True, voter=True, speed=1.0) for n in "ab"]
    for bad in ({"speed": "fast"}, {"speed": float("nan")}, {"speed": float("inf")}, {"speed": -1.0},
                {"speed": True}, {"free_memory": "lots"}, {"free_memory": -5}, {"free_memory": 1.5}):
        fields = {"backend": "torch", "free_memory": 8 << 30, "member": True, "voter": True, "speed": 1.0, **bad}
        rogue = Member("r", **fields)
        p = plan(placeable([*honest, rogue]), SMOL)
        assert "r" not in p.nodes and sorted(shares(p)) == [15, 15], bad


def test_the_score_is_refined_from_the_stages_own_decode_steps_once_there_are_enough() -> None:
    from mesh.pipeline.stage_host import StageStats
    from mesh.sizing import observed_speed

    stats = StageStats()
    for seconds in [0.03] * 10 + [0.02] + [0.05] * 4:
        stats.record_decode((0, 10), seconds)
    assert observed_speed(stats.decode_layers, stats.decode_best_s, stats.decode_samples, "m") is None  # 15 steps
    stats.record_decode((0, 10), 0.04)
    score, source = observed_speed(stats.decode_layers, stats.decode_best_s, stats.decode_samples, "938 layers/s, m")
    assert score == 500.0  # 10 layers in the best step, 20 ms
    assert source.startswith("observed: best of 16 one-session decode steps of layers 0-9") and "938 layers/s" in source
    stats.record_decode((10, 30), 0.5)  # a new plan gave it other layers: their own record
    assert (stats.decode_layers, stats.decode_samples, stats.decode_best_s) == ((10, 30), 1, 0.5)


def test_a_budget_is_refused_above_the_machine_and_below_one_layer_but_zero_offers_no_layers() -> None:
    import pytest

    from mesh.sizing import MemoryBudgetError, check_budget

    profile = ModelProfile(30, 14 * MIB, 108 * MIB, 27 * MIB, kv_bytes_per_layer=12 * MIB)
    check_budget(26 * MIB, profile, 1 << 30)  # exactly one layer with its KV reserve
    check_budget(0, profile, 1 << 30)  # a node that only votes and serves clients
    with pytest.raises(MemoryBudgetError, match="cannot hold even one layer: a layer needs 26.0 MiB"):
        check_budget(26 * MIB - 1, profile, 1 << 30)
    with pytest.raises(MemoryBudgetError, match="more than this machine has"):
        check_budget((1 << 30) + 1, profile, 1 << 30)
    assert plan([NodeCapacity("a", 8 << 30, 1.0), NodeCapacity("z", 0, 9.0)], profile).nodes == ["a"]


def test_the_stage_host_records_one_session_decode_steps_but_none_of_a_head_stage() -> None:
    from pathlib import Path

    import numpy as np

    from kernels.stage import StageSpec, StepInput
    from mesh.pipeline.stage_host import StageHost

    class Fake:
        def __init__(self, spec):
            self.spec = spec

        def forward(self, items):
            return [np.zeros((1, 4), np.float32) for _ in items]

        def free(self, session):
            pass

    host = StageHost("n", Path("unused.gguf"), backend="torch", weight_mode="float32", runner=None,
                     send=lambda *a: True)
    one = [StepInput("s", 3, hidden=np.zeros((1, 4), np.float32))]
    host._forward_pass(Fake(StageSpec(0, 10, embed=True)), one, [])
    host._forward_pass(Fake(StageSpec(0, 10, embed=True)), [StepInput("s", 0, hidden=np.zeros((5, 4)))], [])  # prefill
    host._forward_pass(Fake(StageSpec(0, 10, embed=True)), one + [StepInput("t", 0, hidden=np.zeros((1, 4)))], [])
    assert (host.stats.decode_layers, host.stats.decode_samples) == ((0, 10), 1)
    host._forward_pass(Fake(StageSpec(20, 30, head=True)), one, [])
    assert (host.stats.decode_layers, host.stats.decode_samples) == ((0, 10), 1)
