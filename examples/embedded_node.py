"""An asyncio application that embeds a mesh node.

Run it:  python examples/embedded_node.py ["your question"]

The node joins (or, alone, founds) a loopback cluster, loads its share of the model,
and streams an answer while the application's own task keeps running on the same
event loop: model compute runs on the node's compute thread, never on the loop.
Other devices could join this node's cluster with `mesh join --peer 127.0.0.1:PORT`.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time

import mesh


async def ticker(stop: asyncio.Event, ticks: list[float]) -> None:
    """The application's own work: proof that the loop stays responsive during generation."""
    while not stop.is_set():
        ticks.append(time.perf_counter())
        await asyncio.sleep(0.05)


async def main(question: str) -> None:
    with tempfile.TemporaryDirectory(prefix="mesh-embedded-") as state:
        config = mesh.NodeConfig(name="embedded", state_dir=state, mdns=False)
        async with mesh.Node(config) as node:
            await node.wait_ready(timeout=120)
            plan = node.status()["plan"]
            print(f"node {node.node_id} ready: {len(plan['stages'])} stage(s), "
                  f"API on http://127.0.0.1:{node.api.port}", flush=True)
            stop, ticks = asyncio.Event(), []
            app_task = asyncio.create_task(ticker(stop, ticks))
            tokens, started = 0, time.perf_counter()
            print("answer: ", end="", flush=True)
            async for event in node.generate(question, max_tokens=32):
                print(event.text, end="", flush=True)
                tokens += not event.stop_token
            elapsed = time.perf_counter() - started
            stop.set()
            await app_task
            gaps = [b - a for a, b in zip(ticks, ticks[1:])]
            print()
            print(f"tokens: {tokens} in {elapsed:.2f}s")
            print(f"app ticks during generation: {len(ticks)}, longest gap {max(gaps, default=0) * 1000:.0f} ms")
    print("node stopped")


if __name__ == "__main__":
    from actors import log

    log.configure(format="console", level="WARNING")  # the mesh's own logs: warnings only
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "What is a mesh network? One sentence."))
