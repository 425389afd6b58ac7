"""End to end with real processes: the coordinator's `mesh join` process is SIGKILLed
mid-generation; the answer still arrives, token for token what the fault-free
single-device run gives. (Every kind of kill, two in a row and degraded mode run on the
in-process mesh: tests/inproc/test_failover.py.)

One 3-node cluster serves every trial: after each kill the node is restarted (same
identity, state dir and ports) and rejoins, and the next trial waits for a 3-stage
plan again. Every step has a time bound and fails with the cluster's state.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from meshtest import MODES, PROMPTS, Request, run, running_cluster

from mesh.testing.kills import KillFault, stream_with_faults
from mesh.testing.launcher import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_TOKENS = 32
TRIALS = [  # (what dies, which stage, sampling mode)
    ("coordinator", None, "sampled"),
]


@pytest.fixture(scope="module")
def cluster():
    with running_cluster(3) as c:
        yield c


def _restore(cluster: LocalCluster) -> None:
    for node in cluster.nodes:
        if not node.alive:
            cluster.restart(node.index)
    run(cluster.wait_ready(timeout=120, stages=len(cluster.nodes)))


@pytest.mark.parametrize("kind,stage,mode", TRIALS, ids=[f"{k}{'' if s is None else s}-{m}" for k, s, m in TRIALS])
def test_kill_mid_generation_gives_identical_tokens(cluster, reference, kind, stage, mode):
    rng = random.Random(f"{kind}{stage}{mode}")
    req = Request(PROMPTS[rng.randrange(len(PROMPTS))], MODES[mode], max_tokens=MAX_TOKENS)
    expected = reference.tokens(req)
    after = rng.randint(1, max(1, len(expected) - 2))
    _restore(cluster)
    view = run(cluster.wait_ready(timeout=60, stages=3))
    fault = KillFault(kind, after, stage)

    async def trial():
        return await asyncio.wait_for(
            stream_with_faults(cluster, view, req.prompt, [fault], max_tokens=req.max_tokens,
                               temperature=req.temperature, seed=req.seed), 120)

    result, failovers, serving = run(trial())
    assert result.token_ids == expected, f"kill {kind} {stage} after {after} tokens changed the answer"
    assert result.text == reference._tokenizer.decode(expected, skip_special_tokens=True)
    assert len(failovers) == 1 and failovers[0]["kind"] == kind and failovers[0]["at_token"] >= after
    assert failovers[0]["recovery_s"] is not None and failovers[0]["recovery_s"] < 30
    killed = failovers[0]["node"]
    assert killed not in [s["node"] for s in result.mesh["pipeline"]], "the dead node is still in the pipeline"
    _restore(cluster)
