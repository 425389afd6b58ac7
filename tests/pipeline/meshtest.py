"""Shared pieces of the pipeline tests (fixtures in conftest.py): the prompts, the single-device reference
(computed in this process with kernels, once per test session) and real local
clusters of `mesh join` processes (started once per module and shared by its tests).

Timings on the shared 2-core test machine are noisy; nothing here asserts a speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

import aiohttp
from reference import MAX_TOKENS, MODES, PROMPTS, SEED, TEMPERATURE, Reference, Request  # noqa: F401

from mesh.http.client import StreamResult, stream_chat
from mesh.testing.launcher import LocalCluster


def run(coro):
    return asyncio.run(coro)


async def ask(api: str, req: Request, **kw) -> StreamResult:
    return await stream_chat(api, req.prompt, max_tokens=req.max_tokens, temperature=req.temperature,
                             seed=req.seed, timeout=kw.pop("timeout", 180.0), **kw)


async def ask_all(api: str, requests: list[Request]) -> list[StreamResult]:
    """Start every request at once (continuous batching on the stages)."""
    return list(await asyncio.gather(*(ask(api, r) for r in requests)))


async def cluster_view(api: str) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(api + "/v1/cluster") as resp:
            return await resp.json()


async def post_json(api: str, path: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.post(api + path, json=body) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except json.JSONDecodeError:
                return resp.status, {"raw": text}


@contextlib.contextmanager
def running_cluster(n: int, *, backend: str = "torch", ready_timeout: float = 180.0, stages: int | None = None,
                    **kw) -> Iterator[LocalCluster]:
    """Start ``n`` nodes, wait for a ready plan with ``stages`` stages (default n), stop on exit."""
    cluster = LocalCluster(n=n, backend=backend, **kw)
    with cluster:
        run(cluster.wait_ready(timeout=ready_timeout, stages=n if stages is None else stages))
        yield cluster


