from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.planner import InsufficientMemory, ModelProfile, NodeCapacity, plan

MIB = 1 << 20
SMOL = ModelProfile(n_layers=30, layer_bytes=10 * MIB, embed_bytes=108 * MIB, head_bytes=108 * MIB)


def nodes_strategy():
    return st.lists(
        st.builds(
            NodeCapacity,
            node_id=st.text("0123456789abcdef", min_size=4, max_size=4),
            free_memory=st.integers(0, 800 * MIB),
            speed=st.floats(0.1, 10.0),
            backend=st.sampled_from(["torch", "mlx"]),
        ),
        min_size=1,
        max_size=6,
        unique_by=lambda n: n.node_id,
    )


@settings(max_examples=300, deadline=None)
@given(nodes_strategy())
def test_plan_covers_every_layer_within_memory(nodes):
    try:
        p = plan(nodes, SMOL)
    except InsufficientMemory as exc:
        assert exc.missing_bytes > 0
        return
    assert p.stages[0].start == 0 and p.stages[-1].end == SMOL.n_layers
    for a, b in zip(p.stages, p.stages[1:]):
        assert a.end == b.start
    by_id = {n.node_id: n for n in nodes}
    for i, s in enumerate(p.stages):
        assert s.n_layers >= 1
        need = s.n_layers * SMOL.layer_bytes
        need += SMOL.embed_bytes if i == 0 else 0
        need += SMOL.head_bytes if i == len(p.stages) - 1 else 0
        assert need <= by_id[s.node_id].free_memory
    assert len({s.node_id for s in p.stages}) == len(p.stages)


@settings(max_examples=100, deadline=None)
@given(nodes_strategy(), st.randoms())
def test_plan_does_not_depend_on_input_order(nodes, rnd):
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    try:
        a = plan(nodes, SMOL)
    except InsufficientMemory:
        with pytest.raises(InsufficientMemory):
            plan(shuffled, SMOL)
        return
    assert plan(shuffled, SMOL) == a


def test_faster_node_gets_more_layers():
    nodes = [NodeCapacity("aaaa", 4096 * MIB, 1.0), NodeCapacity("bbbb", 4096 * MIB, 3.0)]
    p = plan(nodes, SMOL)
    layers = {s.node_id: s.n_layers for s in p.stages}
    assert layers["bbbb"] > 2 * layers["aaaa"]
    assert sum(layers.values()) == 30


def test_equal_nodes_split_evenly():
    nodes = [NodeCapacity(f"n{i}", 4096 * MIB, 1.0) for i in range(3)]
    assert [s.n_layers for s in plan(nodes, SMOL).stages] == [10, 10, 10]


def test_memory_caps_a_fast_node():
    nodes = [NodeCapacity("aaaa", 4096 * MIB, 1.0), NodeCapacity("zzzz", 108 * MIB + 5 * 10 * MIB, 100.0)]
    p = plan(nodes, SMOL)
    assert next(s for s in p.stages if s.node_id == "zzzz").n_layers == 5


def test_single_device_fallback():
    nodes = [NodeCapacity("aaaa", 100 * MIB, 5.0), NodeCapacity("bbbb", 4096 * MIB, 1.0)]
    p = plan(nodes, SMOL, max_stages=1)
    assert len(p.stages) == 1 and p.stages[0].node_id == "bbbb" and p.stages[0].n_layers == 30


def test_insufficient_memory_says_how_much_is_missing():
    nodes = [NodeCapacity("aaaa", 200 * MIB, 1.0), NodeCapacity("bbbb", 200 * MIB, 1.0)]
    with pytest.raises(InsufficientMemory) as info:
        plan(nodes, SMOL)
    needed = 30 * 10 * MIB + 216 * MIB
    assert info.value.missing_bytes == needed - 400 * MIB
    assert "MiB missing" in str(info.value)


def test_node_without_room_is_left_out():
    nodes = [NodeCapacity("aaaa", 4096 * MIB, 1.0), NodeCapacity("bbbb", 1 * MIB, 1.0), NodeCapacity("cccc", 4096 * MIB, 1.0)]
    p = plan(nodes, SMOL)
    assert p.nodes == ["aaaa", "cccc"]


def test_many_random_plans_are_deterministic():
    rnd = random.Random(7)
    for _ in range(50):
        nodes = [NodeCapacity(f"{rnd.getrandbits(16):04x}", rnd.randint(300, 2000) * MIB, rnd.uniform(0.5, 4)) for _ in range(4)]
        assert plan(nodes, SMOL) == plan(list(reversed(nodes)), SMOL)
