"""`mesh demo --json` on the default model, with the measured speed scores (no --speed):
three nodes on one host get a balanced plan (most layers <= 1.5x the fewest), within the
budget --node-memory gives each node; the JSON carries the plan at the start.

It used to split 28/1/1: a tiny matvec timed while the other nodes were still starting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kernels.config import load_config
from mesh import sizing
from mesh.node import NodeConfig
from mesh.planner import NodeCapacity, plan

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BUDGET = "350MiB"  # below a third of the model with its KV reserve beside the embedding: the ends hold fewer


def test_demo_on_measured_scores_gives_a_balanced_plan_within_the_node_budgets(model_path):
    out = subprocess.run([sys.executable, "-m", "mesh", "demo", "--json", "--max-tokens", "8", "--audit-rate", "0",
                          "--node-memory", BUDGET, "--timeout", "240"],
                         capture_output=True, text=True, timeout=560, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    start = result["plan_at_start"]
    assert [s["index"] for s in start] == [0, 1, 2] and len({s["node"] for s in start}) == 3
    layers = [s["layers"][1] - s["layers"][0] for s in start]
    assert start[0]["layers"][0] == 0 and start[-1]["layers"][1] == 30
    assert max(layers) <= 1.5 * min(layers), layers
    defaults = NodeConfig()
    profile = sizing.model_profile(load_config(model_path), "float32", kv_sessions=defaults.kv_sessions,
                                   kv_context=defaults.kv_context)
    budget = sizing.memory_bytes(BUDGET)
    expected = plan([NodeCapacity(f"n{i}", budget, 1.0) for i in range(3)], profile)
    assert layers == [s.n_layers for s in expected.stages]  # the ends are capped by the budget: it holds
    assert result["pipeline"] == start and not result["failovers"]
    assert result["token_ids"]
