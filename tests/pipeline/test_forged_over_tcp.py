"""Once over real TCP (issue 17, part 1): a rogue that holds the cluster secret but is
not a member — a fresh key in this test process, its own ActorSystem on loopback —
sends a coordinator-only message (a plan routing the model through itself, and its
PlanReady) to a real `mesh join` process. The node refuses both, logs each with the
rogue's id, keeps its plan, and serves the single-device tokens."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from meshtest import ask, cluster_view, running_cluster
from reference import PROMPTS, Request

from actors import ActorSystem, NodeIdentity
from mesh.pipeline.messages import PlanReady, PlanUpdate, StageEntry
from mesh.pipeline.stage_host import STAGE_ACTOR
from mesh.secret_files import read_secret_file

pytestmark = [pytest.mark.timeout(300)]


def forged_lines(path, peer: str) -> list[dict]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") == "link.forged" and event.get("peer") == peer:
            lines.append(event)
    return lines


async def until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.1)


def test_forged_plan_from_a_stranger_with_the_secret_is_refused_over_tcp(reference):
    req = Request(PROMPTS[1], 0.0, max_tokens=8)
    with running_cluster(1, ready_timeout=180.0) as cluster:
        node = cluster.nodes[0]

        async def attack():
            before = await cluster_view(node.api)
            rogue = ActorSystem(NodeIdentity.generate(), read_secret_file(cluster.secret_file, flag="--secret-file"))
            await rogue.start("127.0.0.1", 0)
            try:
                target = await asyncio.wait_for(rogue.connect("127.0.0.1", node.port), 10)
                plan = before["plan"]
                layers = max(s["layers"][1] for s in plan["stages"])
                version = plan["version"] + 1
                rogue.ref(target, STAGE_ACTOR).tell(PlanUpdate(before["term"], version, target, before["model"],
                                                               [StageEntry(0, rogue.node_id, 0, layers, "torch")]))
                rogue.ref(target, STAGE_ACTOR).tell(PlanReady(before["term"], version))
                await until(lambda: len(forged_lines(node.log_path, rogue.node_id)) >= 2, 60, "the refusals logged")
                answer = await ask(node.api, req, timeout=120.0)
                return rogue.node_id, before, await cluster_view(node.api), answer
            finally:
                await rogue.stop()

        rogue_id, before, after, answer = asyncio.run(attack())
        lines = forged_lines(node.log_path, rogue_id)
    assert {e["type"] for e in lines} == {"PlanUpdate", "PlanReady"}, lines
    assert all("coordinator" in e["reason"] for e in lines)
    assert after["plan"]["version"] == before["plan"]["version"] and after["plan"]["ready"]
    assert rogue_id not in {s["node"] for s in after["plan"]["stages"]}
    assert answer.token_ids == reference.tokens(req)
