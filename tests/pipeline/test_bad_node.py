"""A node that cannot load its layers (its model file is a corrupt copy of the GGUF:
one tensor of every layer renamed, so the header and tokenizer read but no stage
loads). The coordinator leaves it out and re-plans on the others, which go on
serving; when no node can load the model, the client gets a clear error."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from meshtest import PROMPTS, Request, ask, cluster_view, post_json, run, running_cluster

from mesh.testing.launcher import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def corrupt_copy(model_path: Path, dst: Path) -> Path:
    data = bytearray(model_path.read_bytes())
    for layer in range(30):  # whatever layers the plan gives the node, one is broken
        name = f"blk.{layer}.ffn_down.weight".encode()
        at = data.find(name)
        assert at >= 0 and data.count(name) == 1
        data[at:at + len(name)] = name.replace(b"down", b"dowX")  # same length: offsets unchanged
    dst.write_bytes(bytes(data))
    return dst


def test_node_that_cannot_load_is_left_out_and_the_rest_serve(model_path, tmp_path, reference):
    bad = corrupt_copy(model_path, tmp_path / "corrupt.gguf")
    req = Request(PROMPTS[2], 0.0, max_tokens=16)
    warming = reference.warm([req])
    # Node 2 runs a corrupt model file: the first plan gives it layers, its load fails.
    with running_cluster(3, stages=2, node_args={2: ["--model", str(bad)]}) as cluster:
        view = run(cluster_view(cluster.nodes[0].api))
        stage_nodes = {s["node"] for s in view["plan"]["stages"]}
        assert cluster.nodes[2].node_id not in stage_nodes
        assert stage_nodes == {cluster.nodes[0].node_id, cluster.nodes[1].node_id}
        assert view["plan"]["version"] >= 2  # re-planned after the failed load
        # Every node serves, the one with the bad file too (it is still a member).
        async def everywhere():
            return await asyncio.gather(*(ask(n.api, req) for n in cluster.nodes))

        results = run(everywhere())
    warming.join()
    assert [r.token_ids for r in results] == [reference.tokens(req)] * 3


def test_when_no_node_can_load_the_client_is_told_why(model_path, tmp_path):
    bad = corrupt_copy(model_path, tmp_path / "corrupt.gguf")
    cluster = LocalCluster(n=1, backend="torch", model=str(bad))
    with cluster:
        api = cluster.nodes[0].api

        async def degraded() -> dict:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    view = await cluster_view(api)
                except Exception:  # not listening yet
                    view = None
                if view and (view.get("plan") or {}).get("error"):
                    return view
                await asyncio.sleep(0.3)
            raise AssertionError(f"no degraded plan reported; node log:\n{cluster.log_tail(0)}")

        view = run(degraded())
        status, obj = run(post_json(api, "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}))
    assert view["plan"]["stages"] == []
    assert status == 503, obj
    message = obj["error"]["message"]
    assert "load" in message and "blk.0.ffn_down.weight" in message, message
