"""Process-level faults the demo injects: SIGKILL a node after T generated tokens.

``kill:stage=K:after=T`` kills the node holding stage K; ``kill:coordinator:after=T``
kills the coordinator of that moment. Faults of the verification kind
(``stage=K:SPEC``) are applied by the nodes themselves, not here.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

from mesh.errors import MeshError
from mesh.testing.launcher import LocalCluster


class BadFaultSpec(MeshError):
    pass


@dataclass(frozen=True)
class KillFault:
    target: str  # "stage" | "coordinator"
    after: int  # generated tokens before the kill
    stage: int | None = None

    @property
    def kind(self) -> str:
        return self.target


def parse_kill(spec: str) -> KillFault | None:
    """A KillFault for a ``kill:...`` spec, None for other fault kinds."""
    parts = spec.split(":")
    if parts[0] != "kill":
        return None
    fields = dict(p.split("=", 1) if "=" in p else (p, "") for p in parts[1:])
    try:
        after = int(fields.pop("after"))
        if "coordinator" in fields:
            fields.pop("coordinator")
            fault = KillFault("coordinator", after)
        else:
            fault = KillFault("stage", after, int(fields.pop("stage")))
    except (KeyError, ValueError):
        raise BadFaultSpec(f"--fault {spec!r}: use kill:stage=K:after=T or kill:coordinator:after=T") from None
    if fields or after < 0:
        raise BadFaultSpec(f"--fault {spec!r}: unexpected {', '.join(fields) or 'negative after'}")
    return fault


class Killer:
    """Carries out kill faults during the stream and measures recovery (kill -> next token)."""

    def __init__(self, cluster: LocalCluster, view: dict, kills: list[KillFault], *, quiet: bool):
        self.cluster = cluster
        self.view = view
        self.pending = sorted(kills, key=lambda k: k.after)
        self.quiet = quiet
        self.done: list[dict] = []
        self.waiting: dict | None = None  # the kill whose next token we wait for
        self._tasks: list[asyncio.Task] = []
        self._index = {n.node_id: n.index for n in cluster.nodes}
        self.serving = 0  # the node the client talks to; never a kill target

    def serving_index(self) -> int:
        """A node no planned kill targets: the stage nodes named, and the current coordinator."""
        avoid = {self.view.get("coordinator")} if any(k.target == "coordinator" for k in self.pending) else set()
        stages = self.view["plan"]["stages"]
        avoid |= {stages[k.stage]["node"] for k in self.pending if k.target == "stage" and k.stage < len(stages)}
        for node in self.cluster.nodes:
            if node.node_id not in avoid:
                return node.index
        raise BadFaultSpec("every node is a kill target; the serving node must survive (add --nodes)")

    def on_tokens(self, tokens: int) -> None:
        if self.pending and tokens >= self.pending[0].after:
            fault = self.pending.pop(0)
            self._tasks.append(asyncio.get_running_loop().create_task(self._kill(fault, tokens)))

    def on_text(self) -> None:
        if self.waiting is not None and "recovery_s" not in self.waiting and "killed_at" in self.waiting:
            self.waiting["recovery_s"] = time.perf_counter() - self.waiting.pop("killed_at")
            self.waiting = None

    async def _kill(self, fault: KillFault, at_token: int) -> None:
        import aiohttp

        if fault.target == "coordinator":
            async with aiohttp.ClientSession() as http:
                view = await self.cluster.status(self.serving, http) or self.view
            node = view.get("coordinator")
        else:
            stages = (self.view.get("plan") or {}).get("stages", [])
            if self.done:  # the plan changed since start: ask for the current one
                async with aiohttp.ClientSession() as http:
                    view = await self.cluster.status(self.serving, http) or self.view
                stages = (view.get("plan") or {}).get("stages", [])
            node = stages[fault.stage]["node"] if fault.stage < len(stages) else None
        if node is None or node not in self._index:
            raise BadFaultSpec(f"no node to kill for {fault}")
        self.cluster.kill(self._index[node])
        record = {"kind": fault.target, "node": node, "at_token": at_token, "killed_at": time.perf_counter()}
        self.done.append(record)
        self.waiting = record
        if not self.quiet:
            print(f"\n[killed {fault.target} node {node[:8]} after {at_token} tokens]", file=sys.stderr)

    async def finish(self) -> None:
        for task in self._tasks:
            await task

    def report(self, cluster_failovers: list[dict]) -> list[dict]:
        if not self.done:
            return cluster_failovers
        return [{"kind": r["kind"], "node": r["node"], "at_token": r["at_token"],
                 "recovery_s": r.get("recovery_s")} for r in self.done]


async def stream_with_faults(cluster: LocalCluster, view: dict, prompt: str, kills: list[KillFault], *,
                             quiet: bool = True, on_text=None, serving: int | None = None, **params):
    """Stream one answer from a node no fault targets (or node ``serving``) while the
    faults happen. Returns (StreamResult, failover records, serving node index)."""
    from mesh.http.client import stream_chat

    killer = Killer(cluster, view, kills, quiet=quiet)
    killer.serving = killer.serving_index() if serving is None else serving
    serving = cluster.nodes[killer.serving]

    def text(piece: str) -> None:
        killer.on_text()
        if on_text is not None:
            on_text(piece)

    result = await stream_chat(serving.api, prompt, on_text=text, on_tokens=killer.on_tokens, **params)
    await killer.finish()
    return result, killer.report(result.mesh.get("failovers", [])), serving.index
