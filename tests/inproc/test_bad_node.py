"""A node that cannot load its layers (its model file is a corrupt copy of the GGUF:
one tensor of every layer renamed, so the header and tokenizer read but no stage
loads). The coordinator leaves it out and re-plans on the others, which go on
serving; when no node can load the model, the client gets a clear error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from reference import PROMPTS, Request

from actors.clock import LOOP_CLOCK
from mesh.errors import Unavailable
from mesh.testing.inproc import InProcessMesh

pytestmark = [pytest.mark.timeout(300)]


def corrupt_copy(model_path: Path, dst: Path) -> Path:
    data = bytearray(model_path.read_bytes())
    for layer in range(30):  # whatever layers the plan gives the node, one is broken
        name = f"blk.{layer}.ffn_down.weight".encode()
        at = data.find(name)
        assert at >= 0 and data.count(name) == 1
        data[at:at + len(name)] = name.replace(b"down", b"dowX")  # same length: offsets unchanged
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def bad_model(model_path, tmp_path_factory) -> Path:
    return corrupt_copy(model_path, tmp_path_factory.mktemp("bad") / "corrupt.gguf")


def test_node_that_cannot_load_is_left_out_and_the_rest_serve(vrun, bad_model, reference):
    req = Request(PROMPTS[2], 0.0, max_tokens=16)

    async def scenario():
        mesh = InProcessMesh(seed=101)
        try:
            await mesh.add()
            await mesh.add()
            bad = await mesh.add(model=str(bad_model))  # the first plan gives it layers; its load fails
            await mesh.wait_ready(stages=2)
            plan = mesh.nodes[0].plan.update
            # every node serves, the one with the bad file too (it is still a member)
            got = await asyncio.gather(*(mesh.tokens(req.prompt, node=i, max_tokens=req.max_tokens)
                                         for i in range(3)))
            return bad.node_id, [n.node_id for n in mesh.nodes[:2]], plan, got
        finally:
            await mesh.stop()

    bad, good, plan, got = vrun(scenario())
    assert {s.node for s in plan.stages} == set(good) and bad not in {s.node for s in plan.stages}
    assert plan.version >= 2  # re-planned after the failed load
    assert got == [reference.tokens(req)] * 3


def test_when_no_node_can_load_the_client_is_told_why(vrun, bad_model):
    async def scenario():
        mesh = InProcessMesh(seed=102, model=str(bad_model))
        try:
            await mesh.start(1)
            node = mesh.nodes[0]
            await mesh.wait_for(lambda: bool(node.plan.error), timeout=60, what="a degraded plan")
            started = LOOP_CLOCK.now()
            with pytest.raises(Unavailable) as refused:
                await mesh.tokens("hi", max_tokens=4)
            return node.plan.update, str(refused.value), LOOP_CLOCK.now() - started
        finally:
            await mesh.stop()

    plan, message, took = vrun(scenario())
    assert plan.stages == []
    assert "load" in message and "blk.0.ffn_dowX.weight" in message, message  # names the tensor it cannot place
    assert took < 1.0  # at once, not after a wait
