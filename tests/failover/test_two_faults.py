"""Two faults in a row in a 4-node cluster: the coordinator's device (which holds a
stage) dies, then the coordinator elected after it dies too. The request completes
with the fault-free tokens. The serving node votes but never leads (--no-campaign),
so neither kill can take down the client's own connection."""

from __future__ import annotations

import asyncio

import pytest
from meshtest import Request, run, running_cluster

from mesh.testing.kills import KillFault, stream_with_faults

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_stage_then_new_coordinator_die_and_the_answer_is_unchanged(reference):
    req = Request("Describe a sunrise over the mountains.", 0.8, seed=7, max_tokens=40)
    expected = reference.tokens(req)
    assert len(expected) > 20
    with running_cluster(4, node_args={3: ["--no-campaign"]}) as cluster:
        view = run(cluster.wait_ready(stages=4))
        assert view["coordinator"] != cluster.nodes[3].node_id
        faults = [KillFault("coordinator", 5), KillFault("coordinator", 15)]

        async def trial():
            return await asyncio.wait_for(
                stream_with_faults(cluster, view, req.prompt, faults, serving=3, max_tokens=req.max_tokens,
                                   temperature=req.temperature, seed=req.seed), 240)

        result, failovers, serving = run(trial())
        assert result.token_ids == expected
        assert [f["kind"] for f in failovers] == ["coordinator", "coordinator"]
        assert failovers[0]["node"] != failovers[1]["node"]
        assert all(f["recovery_s"] is not None for f in failovers)
        assert len(result.mesh["pipeline"]) == 2  # the two survivors hold the model
