"""The 3-node mesh as a client sees it (real `mesh join` processes, HTTP API): bad
requests, a client that goes away. (Concurrent sessions: test_equivalence.py.)"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from meshtest import PROMPTS, Request, ask, cluster_view, post_json, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


async def _expect_error(api: str, body: dict, status: int, *words: str, path: str = "/v1/chat/completions") -> dict:
    got_status, obj = await post_json(api, path, body)
    assert got_status == status, obj
    message = obj["error"]["message"]
    for word in words:
        assert word in message, message
    return obj


def test_bad_requests_get_clear_errors_while_the_mesh_keeps_serving(cluster3, reference):
    api = cluster3.nodes[1].api
    good = Request(PROMPTS[3], 0.0)
    long_prompt = "the quick brown fox jumps over the lazy dog " * 1000  # about 9000 tokens > 8192

    async def scenario():
        in_flight = asyncio.create_task(ask(api, good))  # a session running through all of it
        msgs = lambda text: [{"role": "user", "content": text}]  # noqa: E731
        await _expect_error(api, {"messages": msgs(long_prompt), "max_tokens": 8}, 400, "context", "8192")
        await _expect_error(api, {"messages": msgs("hi"), "max_tokens": 8190}, 400, "max_tokens")
        for bad in (0, -5):
            await _expect_error(api, {"messages": msgs("hi"), "max_tokens": bad}, 400, "max_tokens")
        obj = await _expect_error(api, {"model": "gpt-17", "messages": msgs("hi")}, 404, "gpt-17", "smollm2-135m")
        assert obj["error"]["code"] == "model_not_found"
        await _expect_error(api, {"model": "gpt-17", "prompt": "hi"}, 404, "gpt-17", path="/v1/completions")
        await _expect_error(api, {"prompt": "", "max_tokens": 4}, 400, "empty", path="/v1/completions")
        return await in_flight

    result = run(scenario())
    assert result.token_ids == reference.tokens(good)
    after = run(ask(api, Request(PROMPTS[0], 0.0, max_tokens=8)))  # and serves the next one
    assert after.token_ids == reference.tokens(Request(PROMPTS[0], 0.0))[:8]


async def _metric(api: str, name: str) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(api + "/metrics") as resp:
            for line in (await resp.text()).splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_client_that_goes_away_ends_its_session(cluster3):
    """The serving node ends the session when the client's connection drops, every stage
    drops it and the pipeline stops computing it (that the KV caches are freed at once is
    checked from inside the stages in test_stage_integrity)."""
    api = cluster3.nodes[2].api
    apis = [n.api for n in cluster3.nodes]

    async def scenario():
        body = {"messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}],
                "max_tokens": 400, "stream": True}
        steps_at = [(await cluster_view(a))["stage"]["steps"] for a in apis]
        async with aiohttp.ClientSession() as http:
            async with http.post(api + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                chunks = 0
                async for line in resp.content:
                    if line.startswith(b"data: ") and b'"content"' in line:
                        chunks += 1
                        if chunks == 5:
                            break
                assert await _metric(api, "mesh_sessions_active") == 1
                held = [(await cluster_view(a))["stage"]["sessions"] for a in apis]
                assert held == [1, 1, 1]
            # leaving the blocks closes the connection: the client went away mid-stream
        deadline = time.monotonic() + 15
        while await _metric(api, "mesh_sessions_active") != 0:
            assert time.monotonic() < deadline, "the serving node still holds the session"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        steps_quiet = [(await cluster_view(a))["stage"]["steps"] for a in apis]
        await asyncio.sleep(1.0)
        views = [await cluster_view(a) for a in apis]
        steps_later = [v["stage"]["steps"] for v in views]
        return steps_at, steps_quiet, steps_later, [v["stage"]["sessions"] for v in views]

    steps_at, steps_quiet, steps_later, held = run(scenario())
    assert held == [0, 0, 0]
    assert steps_quiet == steps_later, "the pipeline kept computing a session nobody reads"
    assert all(q - a < 400 for a, q in zip(steps_at, steps_quiet))

