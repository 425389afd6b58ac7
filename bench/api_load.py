"""The HTTP API under a flood: prints one JSON object.

    python bench/api_load.py [--clients 100] [--max-tokens 8] [--rounds 2]

One real node (`mesh join` on loopback, the default model) with the API's default limits
(16 generations at once, 64 waiting). ``--clients`` clients each send one chat completion
at the same moment, while a poller reads /v1/cluster in a loop. Reported per round: the
status codes (how many 429s), the /v1/cluster latency p50/p99 during the flood and its
ratio to the same poller on the idle node just before (the same-run baseline), whether
the node's process is alive and answers a generation afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter

import aiohttp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mesh.testing.launcher import LocalCluster  # noqa: E402


def percentiles(samples: list[float]) -> dict:
    a = np.asarray(samples) * 1000
    return {"n": len(samples), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2)}


async def poll_cluster(http: aiohttp.ClientSession, url: str, stop: asyncio.Event, out: list[float],
                       errors: Counter) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            async with http.get(url + "/v1/cluster") as resp:
                await resp.read()
                if resp.status != 200:
                    errors[resp.status] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            errors[type(exc).__name__] += 1
        out.append(time.perf_counter() - started)
        await asyncio.sleep(0.01)


async def one_chat(url: str, max_tokens: int, i: int) -> tuple[int | str, float]:
    body = {"messages": [{"role": "user", "content": f"Count to {i % 7 + 3}."}], "max_tokens": max_tokens}
    started = time.perf_counter()
    try:
        # one connection per client, as 100 separate programs would open
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                await resp.read()
                return resp.status, time.perf_counter() - started
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return type(exc).__name__, time.perf_counter() - started


async def round_(url: str, clients: int, max_tokens: int) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        idle: list[float] = []
        stop, errors = asyncio.Event(), Counter()
        poller = asyncio.ensure_future(poll_cluster(http, url, stop, idle, errors))
        await asyncio.sleep(2.0)
        stop.set()
        await poller
        loaded: list[float] = []
        stop = asyncio.Event()
        poller = asyncio.ensure_future(poll_cluster(http, url, stop, loaded, errors))
        started = time.perf_counter()
        results = await asyncio.gather(*(one_chat(url, max_tokens, i) for i in range(clients)))
        flood_s = time.perf_counter() - started
        stop.set()
        await poller
    codes = Counter(str(code) for code, _ in results)
    refused = [t for code, t in results if code == 429]
    served = [t for code, t in results if code == 200]
    idle_p, loaded_p = percentiles(idle), percentiles(loaded)
    return {"codes": dict(codes), "429s": codes.get("429", 0), "flood_s": round(flood_s, 2),
            "429_latency": percentiles(refused) if refused else None,
            "200_latency": percentiles(served) if served else None,
            "cluster_idle": idle_p, "cluster_under_load": loaded_p,
            "cluster_p99_ratio": round(loaded_p["p99_ms"] / idle_p["p99_ms"], 2),
            "cluster_errors": dict(errors)}


async def main(args: argparse.Namespace) -> dict:
    cluster = LocalCluster(n=1, extra_args=["--speed", "1"])
    with cluster:
        await cluster.wait_ready(timeout=240, stages=1)
        url = cluster.nodes[0].api
        rounds = [await round_(url, args.clients, args.max_tokens) for _ in range(args.rounds)]
        after = await one_chat(url, 4, 0)
        alive = cluster.nodes[0].alive
    return {"bench": "api_load", "clients": args.clients, "max_tokens": args.max_tokens,
            "limits": {"max_generations": 16, "max_queue": 64}, "rounds": rounds,
            "node_alive_after": alive, "generation_after": after[0]}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    print(json.dumps(asyncio.run(main(p.parse_args())), indent=1))
