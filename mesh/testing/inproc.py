"""A whole mesh in one process: real Nodes on the memory transport, on virtual time.

    def test_something(model_path):
        async def scenario(mesh: InProcessMesh):
            await mesh.wait_ready(stages=3)
            ids = await mesh.tokens("Why is the sky blue?", max_tokens=16)
            mesh.crash(1)                     # its streams break, it is gone
            ...
        run_mesh(scenario, nodes=3)

Every node is the `Node` that `mesh join` runs, with its real cluster service,
election, planner, stage host (the real kernels on the default model), serving and
verification. Only its surroundings are replaced: the transport is a strict
`MemoryNetwork` (nothing is lost on an open stream; a partition breaks the streams
across it), the clock is a `VirtualTimeLoop`'s, and compute (stages and audits) runs
inline on the loop's thread. Time only moves when every node waits, so a scenario
takes as long as its compute, its outcome depends only on its seed, and a failure
replays.

Node keys are derived from the seed (node ids, and so the election's and the
planner's choices, are the same on every run); the audit schedule is seeded too.

A test puts a rogue node in with ``mesh.add(..., handlers={...})``: its actors'
handlers for the given message types are replaced by the test's, which receive the
node and the message.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
import psutil

from actors.clock import LOOP_CLOCK, VirtualTimeLoop
from actors.transport.memory import MemoryNetwork
from kernels.probe import release_freed_memory
from kernels.runner import InlineRunner
from mesh import models
from mesh.generation import TokenEvent
from mesh.node import Node, NodeConfig
from mesh.pipeline.stage_host import NoObserver, StageObserver
from mesh.verify.service import VerifyConfig
from mesh.verify.worker import InlineAuditCompute

PORT = 7946
Handler = Callable[[Node, Any], Any]


def _seeded_key(state_dir: Path, seed: int, index: int) -> None:
    """A node key derived from (seed, index): the same node ids on every run."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "node.key"
    if not path.exists():
        path.write_bytes(blake3.blake3(f"mesh in-process node {seed}.{index}".encode()).digest()[:32])
        os.chmod(path, 0o600)


class InProcessMesh:
    def __init__(self, *, model: str = models.DEFAULT_MODEL, seed: int = 0, delay: float = 0.0005,
                 workdir: Path | None = None, verify: VerifyConfig | None = None, **config: Any) -> None:
        self.seed = seed
        self.net = MemoryNetwork(delay=delay, strict=True, seed=seed)
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mesh-inproc-"))
        self._own_workdir = workdir is None
        # a fresh secret per mesh, as a real cluster has: never a fixed, public one
        self.base = replace(NodeConfig(), model=model, cluster="inproc", secret=secrets.token_bytes(32), port=PORT,
                            mdns=False,
                            api_port=None, speed=1.0, memory_limit=min(8 << 30, psutil.virtual_memory().total),
                            backend="torch",
                            verify=verify or VerifyConfig(audit_seed=str(seed)))
        self.base = replace(self.base, **config)
        self.nodes: list[Node] = []
        self.hosts: list[str] = []
        self._made: list[tuple[NodeConfig, Any, Any]] = []  # how each node was built (restart)
        self.down: set[int] = set()

    # -- building ---------------------------------------------------------------------

    def host(self, index: int) -> str:
        return f"n{index}"

    async def add(self, *, handlers: dict[str, dict[type, Handler]] | None = None,
                  observe: Callable[[Node, StageObserver], StageObserver] | None = None, **config: Any) -> Node:
        """Start one more node, known to every other as a static peer (``config``: its
        NodeConfig fields). ``handlers``: actor name -> {message type: handler(node, msg)}
        replacing the node's own; ``observe(node, observer)``: wraps its stage's observer."""
        index = len(self.nodes)
        host = self.host(index)
        cfg = replace(self.base, host=host, name=host, state_dir=self.workdir / host,
                      peers=[f"{h}:{PORT}" for h in self.hosts], **config)
        _seeded_key(cfg.state_dir, self.seed, index)
        self._made.append((cfg, handlers, observe))
        self.nodes.append(self._make(index))
        self.hosts.append(host)
        await self.nodes[index].start()
        return self.nodes[index]

    def _make(self, index: int) -> Node:
        cfg, handlers, observe = self._made[index]
        parts = dict(transport=self.net.transport(cfg.host), runner=InlineRunner(cfg.host),
                     audit_compute=InlineAuditCompute(), seed=self.seed * 1000 + index)
        if handlers or observe:
            return _RogueNode(cfg, handlers=handlers or {}, observe=observe, **parts)
        return Node(cfg, **parts)

    async def restart(self, index: int) -> Node:
        """A crashed node comes back: same key, state dir and address."""
        self.net.revive(self.host(index))
        self.nodes[index] = self._make(index)
        self.down.discard(index)
        await self.nodes[index].start()
        return self.nodes[index]

    async def start(self, n: int) -> None:
        for _ in range(n):
            await self.add()

    @classmethod
    async def started(cls, n: int, *, stages: int | None = None, **options: Any) -> "InProcessMesh":
        """``n`` nodes, once they serve a ready plan of ``stages`` stages (default ``n``)."""
        mesh = cls(**options)
        await mesh.start(n)
        await mesh.wait_ready(stages=n if stages is None else stages)
        return mesh

    async def stop(self) -> None:
        for i, node in enumerate(self.nodes):
            if i not in self.down and node.system is not None:
                await node.stop(graceful=False)
        self.nodes.clear()
        release_freed_memory()  # one process runs mesh after mesh: give their layers back now
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- faults -----------------------------------------------------------------------

    async def crash(self, index: int) -> None:
        """Node ``index`` dies: its streams break at once (as a killed process's sockets
        are reset by its kernel), and it runs nothing more."""
        self.net.crash(self.host(index))
        self.down.add(index)
        await self.nodes[index].stop(graceful=False)

    def partition(self, side_a: list[int], side_b: list[int]) -> None:
        self.net.partition({self.host(i) for i in side_a}, {self.host(i) for i in side_b})

    def heal(self) -> None:
        self.net.heal()

    # -- reading ----------------------------------------------------------------------

    @property
    def alive(self) -> list[Node]:
        return [n for i, n in enumerate(self.nodes) if i not in self.down]

    def coordinator(self) -> Node | None:
        for node in self.alive:
            if node.coordinator.active:
                return node
        return None

    async def wait_ready(self, stages: int | None = None, timeout: float = 60.0) -> None:
        """Until every live node serves the same ready plan (of ``stages`` stages), is a
        member in every live node's configuration, and every seat (``max_voters``) is taken
        (a plan uses nodes that are still joining: a scenario that kills voters must start
        from a formed cluster)."""
        deadline = LOOP_CLOCK.now() + timeout
        while True:
            await asyncio.gather(*(n.wait_ready(timeout=max(0.0, deadline - LOOP_CLOCK.now()), stages=stages)
                                   for n in self.alive))
            epochs = {n.plan.epoch for n in self.alive}
            ids = {n.node_id for n in self.alive}
            formed = all(ids <= set(n.cluster.election.members)
                         and len(n.cluster.election.voters) == min(len(ids), n.config.max_voters) for n in self.alive)
            if len(epochs) == 1 and formed and all(n.plan.ready for n in self.alive):
                return
            if LOOP_CLOCK.now() > deadline:
                raise TimeoutError(f"no formed cluster on one ready plan within {timeout} s of virtual time")
            await LOOP_CLOCK.sleep(0.1)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "a condition") -> None:
        """Until ``predicate()`` holds, checked every 50 ms of virtual time."""
        deadline = LOOP_CLOCK.now() + timeout
        while not predicate():
            if LOOP_CLOCK.now() > deadline:
                raise TimeoutError(f"{what} did not hold within {timeout} s of virtual time")
            await LOOP_CLOCK.sleep(0.05)

    async def events(self, prompt: str, *, node: int = 0, **params: Any) -> list[TokenEvent]:
        return [e async for e in self.nodes[node].generate(prompt, **params)]

    async def tokens(self, prompt: str, *, node: int = 0, **params: Any) -> list[int]:
        """The answer's token ids (the stop token left out), served by node ``node``."""
        return [e.token_id for e in await self.events(prompt, node=node, **params) if not e.stop_token]


class _RogueNode(Node):
    """A node a test changed: ``handlers`` is actor name -> {message type: handler(node,
    msg)} replacing its own; ``observe(node, observer)`` wraps its stage's observer."""

    def __init__(self, *args: Any, handlers: dict[str, dict[type, Handler]],
                 observe: Callable[[Node, StageObserver], StageObserver] | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replaced = handlers
        self.observe = observe

    def stage_observer(self) -> StageObserver | None:
        inner = super().stage_observer()
        if self.observe is None:
            return inner
        return self.observe(self, inner if inner is not None else NoObserver())

    def routes(self) -> dict[str, dict[type, Callable[[Any], Any]]]:
        routes = super().routes()
        for actor, handlers in self.replaced.items():
            for kind, handler in handlers.items():
                routes.setdefault(actor, {})[kind] = lambda msg, h=handler: h(self, msg)
        return routes


def run_mesh(scenario: Callable[[InProcessMesh], Awaitable[Any]], *, nodes: int = 3, ready_stages: int | None = None,
             **options: Any) -> Any:
    """Start ``nodes`` nodes on virtual time, wait for a ready plan (of ``ready_stages``
    stages, default ``nodes``), run ``scenario(mesh)``, stop the mesh; returns what the
    scenario returned."""

    async def main() -> Any:
        mesh = InProcessMesh(**options)
        try:
            await mesh.start(nodes)
            await mesh.wait_ready(stages=ready_stages if ready_stages is not None else nodes)
            return await scenario(mesh)
        finally:
            await mesh.stop()

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main())
