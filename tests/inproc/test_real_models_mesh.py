"""The registry's larger models through the whole mesh (issue 15: everything works on
every model), on real in-process nodes on virtual time.

For gemma-3-270m (raw prompts: a base model, no chat template) and qwen2.5-coder-0.5b
(its chat template), float32:

- a 3-stage pipeline gives, token for token, the single-device run (our own full stage,
  which tests/kernels/test_real_models.py checks against transformers), greedy and
  seeded sampling;
- with verification on at the default audit rate, every audit of those steps passes and
  no node is flagged: the f32 tolerance holds for the family;
- a 2-stage pipeline of one torch and one MLX node gives the same greedy tokens, and its
  cross-backend audits pass;
- a stage's node killed mid-answer: the healed pipeline finishes with identical tokens.

The models come from the model cache (`python -m mesh models pull NAME`); `make test`
pulls them before the lanes start.
"""

from __future__ import annotations

import asyncio
import gc
from functools import cache

import pytest

from mesh.generation import GenerationParams
from mesh.testing.inproc import InProcessMesh

pytestmark = [pytest.mark.timeout(900)]

TOKENS = 16
SEED = 1234
# (model, prompts, chat?): the base model gets raw text, the instruct model its chat template
MODELS = {
    "gemma-3-270m": (["The capital of France is", "def fibonacci(n):"], False),
    "qwen2.5-coder-0.5b": (["Write a Python function that reverses a string.", "What is a hash map?"], True),
}


def _path(name: str):
    from mesh import models

    if not models.is_cached(name):
        pytest.skip(f"{name} is not cached: run `python -m mesh models pull {name}`")
    return models.resolve(name)


@cache
def _tokenizer(name: str):
    from kernels.tokenizer import Tokenizer

    return Tokenizer.from_model(_path(name))


def _ids(name: str, prompt: str) -> list[int]:
    tokenizer = _tokenizer(name)
    chat = MODELS[name][1]
    return tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else tokenizer.encode_prompt(prompt)


_EXPECTED: dict[tuple[str, str, float], list[int]] = {}


def _reference(name: str) -> None:
    """Every answer the tests compare with, from the full float32 torch stage on one
    device, computed before the model's mesh starts; the stage is dropped after (the
    whole module in one process must stay well under the machine's memory)."""
    from kernels.config import load_config
    from kernels.generate import generate
    from kernels.loader import load_stage
    from kernels.sampling import SamplingParams
    from kernels.stage import StageSpec

    path = _path(name)
    stage = load_stage(path, StageSpec.full(load_config(path).n_layers), backend="torch")
    for prompt, temperature in _runs(name):
        _EXPECTED[name, prompt, temperature] = list(generate(
            stage, _ids(name, prompt), max_tokens=TOKENS, sampling=SamplingParams(temperature=temperature, seed=SEED),
            stop_ids=_tokenizer(name).eos_token_ids))
    del stage
    gc.collect()


def _expected(name: str, prompt: str, temperature: float) -> list[int]:
    return _EXPECTED[name, prompt, temperature]


async def _answer(mesh: InProcessMesh, name: str, prompt: str, temperature: float, *, node: int) -> list[int]:
    params = GenerationParams.create(max_tokens=TOKENS, temperature=temperature, seed=SEED)
    return [e.token_id async for e in mesh.nodes[node].generate_stream(_ids(name, prompt), params)
            if not e.stop_token]


async def _audits_settled(mesh: InProcessMesh) -> dict:
    def settled() -> bool:
        v = mesh.coordinator().verification()
        return v["audits"] > 0 and v["audits_pending"] == 0

    await mesh.wait_for(settled, timeout=300, what="the answers' audits")
    return mesh.coordinator().verification()


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> str:
    _reference(request.param)
    yield request.param
    gc.collect()


def _runs(model: str) -> list[tuple[str, float]]:
    """One greedy and one seeded sampled answer, on the model's two prompts."""
    prompts = MODELS[model][0]
    return [(prompts[0], 0.0), (prompts[1], 0.8)]


def test_a_torch_and_an_mlx_stage_give_the_same_tokens_and_audit_each_other(vrun, model):
    pytest.importorskip("mlx.core")
    prompt = MODELS[model][0][0]

    async def scenario():
        mesh = InProcessMesh(model=model, seed=82)
        try:
            await mesh.add()
            await mesh.add(backend="mlx")
            await mesh.wait_ready(stages=2)
            backends = {s.node: s.backend for s in mesh.nodes[0].plan.update.stages}
            got = await _answer(mesh, model, prompt, 0.0, node=0)
            return got, await _audits_settled(mesh), backends
        finally:
            await mesh.stop()

    got, v, backends = vrun(scenario())
    assert sorted(backends.values()) == ["mlx", "torch"], backends
    assert got == _expected(model, prompt, 0.0)
    assert v["audits"] >= 2 and v["audit_failures"] == 0 and not v["flagged_nodes"], v


@pytest.fixture(scope="module")
def mesh3(vrun, model):
    """A 3-node mesh on the model, shared by the tests below (the failover test last).
    The MLX test, above, runs before it starts: the two meshes are never held at once
    (one model's mesh peaks at about 9 GB)."""
    m = vrun(InProcessMesh.started(3, model=model, seed=81))
    yield m
    vrun(m.stop())


def test_three_stages_give_the_single_device_tokens_and_pass_every_audit(vrun, model, mesh3):
    runs = _runs(model)

    async def scenario():
        got = [await _answer(mesh3, model, p, t, node=i % 3) for i, (p, t) in enumerate(runs)]
        return got, await _audits_settled(mesh3), [(s.node, s.start, s.end) for s in mesh3.nodes[0].plan.update.stages]

    got, v, stages = vrun(scenario())
    assert len(stages) == 3
    for (prompt, temperature), tokens in zip(runs, got):
        assert tokens == _expected(model, prompt, temperature), (prompt, temperature)
    assert v["verified_links"] > 0 and v["broken_links"] == 0
    assert v["audits"] >= 3 and v["audit_failures"] == 0 and not v["flagged_nodes"], v


def test_a_stage_killed_mid_answer_gives_identical_tokens(vrun, model, mesh3):
    prompt, temperature = _runs(model)[1]
    expected = _expected(model, prompt, temperature)
    mesh = mesh3

    async def scenario():
        coordinator = mesh.nodes.index(mesh.coordinator())
        stages = mesh.nodes[0].plan.update.stages
        victim = next(i for i, n in enumerate(mesh.nodes) if n.node_id == stages[1].node)
        if victim == coordinator:  # the coordinator's death is test_failover's; here a stage's
            victim = next(i for i, n in enumerate(mesh.nodes)
                          if n.node_id in {s.node for s in stages} and i != coordinator)
        serving = next(i for i in range(3) if i not in (victim, coordinator))
        killed = mesh.nodes[victim].node_id
        node = mesh.nodes[serving]
        params = GenerationParams.create(max_tokens=TOKENS, temperature=temperature, seed=SEED)
        tokens = []
        async for event in node.generate_stream(_ids(model, prompt), params):
            if not event.stop_token:
                tokens.append(event.token_id)
            if len(tokens) == 5 and victim not in mesh.down:
                await mesh.crash(victim)
        return tokens, killed, node.plan

    assert len(expected) > 6
    tokens, killed, plan = vrun(asyncio.wait_for(scenario(), 600))
    assert tokens == expected
    assert killed not in [s.node for s in plan.update.stages]
    assert "stage" in {f["kind"] for f in plan.failovers if f["node"] == killed}, plan.failovers
