"""N mesh nodes in ONE process on loopback — for applications, examples and tests.

    async with mesh.local_cluster(3) as cluster:
        async for event in cluster.generate("Why is the sky blue?", max_tokens=32):
            print(event.text, end="")
        print(cluster.api_url(0))  # each node serves the OpenAI-compatible API

Each node is a real `Node` with its own key and state dir (in a temporary folder
removed on exit), all nodes share one fresh random secret, listen on 127.0.0.1 and
know each other as static peers (`--peer`), so start-up never waits on multicast.
mDNS is off unless asked for, and then restricted to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import tempfile
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator

from mesh import models
from mesh.generation import TokenEvent
from mesh.node import Node, NodeConfig


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _stop(node: Node) -> None:
    if node.system is not None:
        await node.stop()
        node.system = None  # marks it stopped: stop() is not idempotent


class LocalMesh:
    """The nodes of an in-process loopback cluster; see `local_cluster`."""

    def __init__(self, nodes: list[Node], workdir: Path, secret: bytes):
        self.nodes = nodes
        self.workdir = workdir
        self.secret = secret

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    def api_url(self, index: int = 0) -> str:
        """Base URL of node ``index``'s HTTP API (``http://127.0.0.1:PORT``)."""
        node = self.nodes[index]
        if node.api is None or node.api.port is None:
            raise ValueError(f"node {index} was started without an HTTP API (api=False)")
        return f"http://127.0.0.1:{node.api.port}"

    async def wait_ready(self, timeout: float = 120.0, stages: int | None = None) -> None:
        """Wait until every running node serves the same ready plan (with ``stages`` stages)."""
        running = [n for n in self.nodes if n.system is not None]
        await asyncio.gather(*(n.wait_ready(timeout=timeout, stages=stages) for n in running))

    async def stop_node(self, index: int) -> None:
        """Stop one node gracefully (it leaves the cluster; the others re-plan)."""
        await _stop(self.nodes[index])

    def generate(self, prompt: str, *, node: int = 0, **params) -> AsyncIterator[TokenEvent]:
        """Stream the answer to one user message, served by node ``node``."""
        return self.nodes[node].generate(prompt, **params)

    def chat(self, messages: list[dict], *, node: int = 0, **params) -> AsyncIterator[TokenEvent]:
        return self.nodes[node].chat(messages, **params)


@asynccontextmanager
async def local_cluster(n: int = 3, *, model: str = models.DEFAULT_MODEL, backend: str = "torch",
                        api: bool = True, api_key: str | None = None, mdns: bool = False,
                        ready_timeout: float = 120.0, threads: int | None = None,
                        **config: object) -> AsyncIterator[LocalMesh]:
    """Start ``n`` nodes in this process on 127.0.0.1, wait for a ready ``n``-stage plan,
    yield a `LocalMesh`, and stop every node (and delete their state dirs) on exit.

    ``api_key`` protects every node's API; ``mdns=True`` announces on 127.0.0.1 only;
    other keyword arguments are `NodeConfig` fields applied to every node.
    """
    if n < 1:
        raise ValueError("a cluster needs at least one node")
    await asyncio.to_thread(models.resolve, model, fetch=True)  # fetch once, not once per node
    workdir = Path(tempfile.mkdtemp(prefix="mesh-local-"))
    secret = secrets.token_bytes(32)
    ports = [_free_port() for _ in range(n)]
    base = NodeConfig(model=model, cluster="local", secret=secret, host="127.0.0.1",
                      api_host="127.0.0.1", api_port=0 if api else None, api_key=api_key,
                      interfaces=["127.0.0.1"], mdns=mdns, backend=backend, threads=threads)
    base = replace(base, **config)
    nodes = [Node(replace(base, port=port, name=f"node{i}", state_dir=workdir / f"node{i}",
                          peers=[f"127.0.0.1:{p}" for p in ports if p != port]))
             for i, port in enumerate(ports)]
    started: list[Node] = []
    try:
        async def start(node: Node) -> None:
            await node.start()
            started.append(node)

        await asyncio.gather(*(start(node) for node in nodes))
        cluster = LocalMesh(nodes, workdir, secret)
        await cluster.wait_ready(timeout=ready_timeout, stages=n)
        yield cluster
    finally:
        # All at once: stopping them one by one would make the survivors re-plan each time.
        await asyncio.gather(*(_stop(node) for node in started), return_exceptions=True)
        shutil.rmtree(workdir, ignore_errors=True)
