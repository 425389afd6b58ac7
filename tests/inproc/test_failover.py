"""Failover on real in-process nodes, on virtual time: a stage's node or the coordinator
dies mid-generation and the answer is token for token the fault-free single-device run;
two faults in a row; survivors too small for the model give a clear, fast error and
recover when the node returns; a partition leaves the majority serving and the
minority refusing, and heals into one cluster."""

from __future__ import annotations

import asyncio
import random

import pytest
from reference import MODES, PROMPTS, Request

from actors.clock import LOOP_CLOCK
from mesh.errors import Unavailable
from mesh.testing.inproc import InProcessMesh

pytestmark = [pytest.mark.timeout(600)]

MAX_TOKENS = 32
TRIALS = [  # (what dies, which stage, sampling mode)
    ("stage", 0, "greedy"),
    ("stage", 1, "sampled"),
    ("stage", 2, "greedy"),
    ("coordinator", None, "sampled"),
]


def _stage_node(mesh: InProcessMesh, stage: int) -> int:
    node_id = mesh.alive[0].plan.update.stages[stage].node
    return next(i for i, n in enumerate(mesh.nodes) if n.node_id == node_id)


async def _stream_with_kills(mesh: InProcessMesh, serving: int, req: Request, kills: list[tuple[int, callable]]):
    """Stream ``req`` from node ``serving``; after ``after`` tokens, crash the node that
    ``pick()`` names then. Returns (tokens, [(killed index, token index, virtual s from the
    kill to the next token)])."""
    node = mesh.nodes[serving]
    ids = node.encode_chat([{"role": "user", "content": req.prompt}])
    from mesh.generation import GenerationParams

    params = GenerationParams.create(max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed)
    pending = sorted(kills, key=lambda k: k[0])
    tokens, done, killed_at = [], [], None
    async for event in node.generate_stream(ids, params):
        if killed_at is not None:
            done[-1] = (*done[-1][:2], LOOP_CLOCK.now() - killed_at)
            killed_at = None
        if not event.stop_token:
            tokens.append(event.token_id)
        while pending and len(tokens) >= pending[0][0]:
            _, pick = pending.pop(0)
            victim = pick()
            if asyncio.iscoroutine(victim):
                victim = await victim
            assert victim != serving, "the test must not kill the serving node"
            await mesh.crash(victim)
            killed_at = LOOP_CLOCK.now()
            done.append((victim, len(tokens), None))
    return tokens, done


@pytest.fixture(scope="module")
def mesh(vrun, model_path):
    m = vrun(InProcessMesh.started(3, seed=21))
    yield m
    vrun(m.stop())


def _restore(mesh: InProcessMesh, vrun) -> None:
    for i in sorted(mesh.down):
        vrun(mesh.restart(i))
    vrun(mesh.wait_ready(stages=3, timeout=60))


@pytest.mark.parametrize("kind,stage,mode", TRIALS, ids=[f"{k}{'' if s is None else s}-{m}" for k, s, m in TRIALS])
def test_kill_mid_generation_gives_identical_tokens(mesh, vrun, reference, kind, stage, mode):
    rng = random.Random(f"{kind}{stage}{mode}")
    req = Request(PROMPTS[rng.randrange(len(PROMPTS))], MODES[mode], max_tokens=MAX_TOKENS)
    expected = reference.tokens(req)
    after = rng.randint(1, max(1, len(expected) - 2))
    _restore(mesh, vrun)
    coordinator = mesh.nodes.index(mesh.coordinator())
    victim = coordinator if kind == "coordinator" else _stage_node(mesh, stage)
    serving = next(i for i in range(3) if i not in (victim, coordinator))
    killed_id = mesh.nodes[victim].node_id
    got, kills = vrun(asyncio.wait_for(_stream_with_kills(mesh, serving, req, [(after, lambda: victim)]), 120))
    assert got == expected, f"kill {kind} {stage} after {after} tokens changed the answer"
    assert len(kills) == 1 and kills[0][1] >= after
    assert kills[0][2] is None or kills[0][2] < 5.0, f"{kills[0][2]:.2f} virtual s from the kill to the next token"
    survivor = mesh.nodes[serving]
    kinds = {f["kind"] for f in survivor.plan.failovers if f["node"] == killed_id}
    # the coordinator's node holds a stage too: killing it is both failovers at once
    assert kinds == ({"coordinator", "stage"} if victim == coordinator else {kind}), survivor.plan.failovers
    assert killed_id not in [s.node for s in survivor.plan.update.stages], "the dead node is still in the pipeline"


def test_stage_then_new_coordinator_die_and_the_answer_is_unchanged(vrun, reference, model_path):
    """Two faults in a row in a 4-node cluster: the coordinator's device (which holds a
    stage) dies, then the coordinator elected after it dies too. The serving node never
    leads (it joins last: a learner until the first dead voter's seat is its), so neither
    kill takes down the client's own node."""
    req = Request("Describe a sunrise over the mountains.", 0.8, seed=7, max_tokens=40)
    expected = reference.tokens(req)
    assert len(expected) > 20

    async def scenario():
        mesh = InProcessMesh(seed=31)
        try:
            for _ in range(3):
                await mesh.add()
            await mesh.add(campaign=False)
            await mesh.wait_ready(stages=4)
            assert not mesh.nodes[3].coordinator.active
            coordinators = []

            async def the_coordinator() -> int:
                # Raft survives one voter lost at a time: the cluster first removes the dead
                # one (after remove_dead_after), else two of four voters are gone at once.
                # Tokens take no virtual time here, so the 15th token can come before that.
                # Its seat then goes to the learner (3 seats of 4 nodes): wait for that too.
                await mesh.wait_for(lambda: all(set(n.cluster.election.voters) <= {a.node_id for a in mesh.alive}
                                                and len(n.cluster.election.voters) == min(len(mesh.alive), 3)
                                                for n in mesh.alive) and mesh.coordinator() is not None,
                                    timeout=30, what="the dead voter's removal and its seat filled")
                index = mesh.nodes.index(mesh.coordinator())
                coordinators.append(mesh.nodes[index].node_id)
                return index

            got, kills = await asyncio.wait_for(
                _stream_with_kills(mesh, 3, req, [(5, the_coordinator), (15, the_coordinator)]), 120)
            # the answer can end before the second failover is planned (tokens take no virtual time)
            await mesh.wait_ready(stages=2)
            return got, kills, coordinators, mesh.nodes[3].plan
        finally:
            await mesh.stop()

    got, kills, coordinators, plan = vrun(scenario())
    assert got == expected
    assert len(kills) == 2 and coordinators[0] != coordinators[1]
    for c in coordinators:
        assert "coordinator" in {f["kind"] for f in plan.failovers if f["node"] == c}, (plan.update, coordinators)
    assert len(plan.update.stages) == 2  # the two survivors hold the model


def test_degraded_mode_says_what_is_missing_and_recovers(vrun, reference, model_path):
    """When the survivors cannot hold the model, requests fail at once with a clear
    error that says how much memory is missing (never a hang), and service resumes
    when the node returns."""
    req = Request("Name three colours.", 0.0, max_tokens=8)
    expected = reference.tokens(req)

    async def scenario():
        # Each node offers 400 MiB: three hold the float32 model with its KV reserve (about 1 GiB), two do not.
        mesh = InProcessMesh(seed=41, memory_limit=400 << 20)
        try:
            await mesh.start(3)
            await mesh.wait_ready(stages=3)
            coordinator = mesh.nodes.index(mesh.coordinator())
            victim = next(i for i in range(3) if i != coordinator)
            alive = next(i for i in range(3) if i not in (victim, coordinator))
            await mesh.crash(victim)
            deadline = LOOP_CLOCK.now() + 30
            while True:
                assert LOOP_CLOCK.now() < deadline, "the cluster kept serving without the memory it needs"
                started = LOOP_CLOCK.now()
                try:
                    await mesh.tokens(req.prompt, node=alive, max_tokens=req.max_tokens)
                except Unavailable as exc:
                    error, took = str(exc), LOOP_CLOCK.now() - started
                    break
                await LOOP_CLOCK.sleep(0.3)
            await mesh.restart(victim)
            await mesh.wait_ready(stages=3)
            return error, took, await mesh.tokens(req.prompt, node=alive, max_tokens=req.max_tokens)
        finally:
            await mesh.stop()

    error, took, after = vrun(scenario())
    assert "MiB missing" in error and "cannot hold the model" in error, error
    assert took < 10, f"the error took {took:.1f} virtual s: degraded requests must fail fast"
    assert after == expected


def test_partition_majority_finishes_minority_refuses_and_heals(vrun, reference, model_path):
    """A stage's node is cut off mid-generation: the majority side finishes with the
    fault-free tokens; the cut-off node has no coordinator and refuses its own requests
    within a bound (never hangs); after healing the three are one cluster again."""
    req = Request("Tell me a short story about a lighthouse keeper and a storm.", 0.0, max_tokens=48)
    expected = reference.tokens(req)

    async def scenario():
        mesh = InProcessMesh(seed=51)
        try:
            await mesh.start(3)
            await mesh.wait_ready(stages=3)
            c = mesh.nodes.index(mesh.coordinator())
            serve, cut = [i for i in range(3) if i != c]
            node = mesh.nodes[serve]
            from mesh.generation import GenerationParams

            ids = node.encode_chat([{"role": "user", "content": req.prompt}])
            got = []
            async for event in node.generate_stream(ids, GenerationParams.create(max_tokens=req.max_tokens)):
                if not event.stop_token:
                    got.append(event.token_id)
                if len(got) == 6 and not mesh.net._cut:
                    mesh.partition([cut], [c, serve])
            assert mesh.net._cut, "the answer ended before the cut"
            await mesh.wait_for(lambda: mesh.nodes[cut].cluster.coordinator is None, timeout=5,
                                what="the minority to have no coordinator")
            asked = LOOP_CLOCK.now()
            with pytest.raises(Unavailable):
                await mesh.tokens("hi", node=cut, max_tokens=4)
            refused_in = LOOP_CLOCK.now() - asked
            majority = {mesh.nodes[i].cluster.coordinator for i in (c, serve)}
            mesh.heal()
            await mesh.wait_for(lambda: len({n.cluster.coordinator for n in mesh.nodes}) == 1
                                and mesh.nodes[0].cluster.coordinator is not None, timeout=20,
                                what="one cluster after healing")
            return got, refused_in, majority
        finally:
            await mesh.stop()

    got, refused_in, majority = vrun(scenario())
    assert got == expected, "the majority side's tokens differ from the fault-free run"
    assert refused_in <= 15.0, f"the minority took {refused_in:.1f} virtual s to refuse"
    assert len(majority) == 1 and None not in majority, "the majority side lost its coordinator"
