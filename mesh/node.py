"""The Node: the one object an application embeds, and what `mesh join` runs.

It composes an actor system (authenticated transport), the cluster service
(discovery, membership, failure detection, election), the pipeline roles (this
node's stage, the sessions it serves, and — while elected — the coordinator) and
the HTTP API. Model compute runs on one ComputeRunner thread; the event loop only
moves messages, so heartbeats and elections keep running during a long prefill.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import psutil
import structlog

from actors import Actor, ActorSystem, NodeIdentity
from kernels.config import load_config
from kernels.runner import ComputeRunner
from kernels.tokenizer import IncrementalDetokenizer, Tokenizer
from mesh import models
from mesh.api import Api, Unavailable
from mesh.cluster.election import ElectionConfig
from mesh.cluster.fence import Fence
from mesh.cluster.service import NO_CAMPAIGN, ClusterService, LocalFacts
from mesh.errors import MeshError
from mesh.generation import GenerationParams, TokenEvent
from mesh.pipeline.coordinator import CoordinatorRole
from mesh.pipeline.messages import (
    EndSession,
    Forward,
    PlanReady,
    PlanUpdate,
    Retransmit,
    SessionFailed,
    StageReady,
    TokenOut,
)
from mesh.pipeline.serving import PlanView, Serving
from mesh.pipeline.stage_host import COORD_ACTOR, SERVE_ACTOR, STAGE_ACTOR, StageHost
from mesh.planner import ModelProfile, NodeCapacity
from mesh.verify import service as verify_service

log = structlog.get_logger("mesh.node")

LOOPBACK = ("127.0.0.1", "::1", "localhost")


class InsecureBind(MeshError):
    pass


_LEADERLESS = ("this node has no coordinator: it cannot reach a majority of the cluster's voters "
               "(cut off from the others, or too few nodes online); retry on another node or when they return")


@dataclass
class NodeConfig:
    model: str = models.DEFAULT_MODEL
    cluster: str = "home"
    secret: bytes | None = None
    host: str = "127.0.0.1"
    port: int = 0
    api_host: str = "127.0.0.1"
    api_port: int | None = 0  # None: no HTTP API
    api_key: str | None = None
    interfaces: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    mdns: bool = True
    backend: str = "auto"
    weight_mode: str = "float32"
    name: str | None = None
    state_dir: Path | None = None
    memory_limit: int | None = None  # bytes offered for layers; default: 80% of available RAM
    threads: int | None = None
    speed: float | None = None  # speed score for the planner; default: measured at start
    max_batch: int = 16
    campaign: bool = True  # False: vote, but never become coordinator (e.g. a node that serves clients)
    leaderless_grace_s: float = 3.0  # without a coordinator this long, stop serving (cut off from the majority)
    audit_rate: float = 0.2  # share of stage steps audited (mesh.verify)
    fault: str | None = None  # test-only misbehaviour, mesh.verify.faults spec

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "mlx" if platform.system() == "Darwin" and platform.machine() == "arm64" else "torch"


def default_secret(cluster: str) -> bytes:
    """The secret of a loopback-only cluster started without --secret-file."""
    return hashlib.blake2b(f"mesh loopback-only cluster {cluster}".encode(), digest_size=32).digest()


class _Inbox(Actor):
    """A thin actor that hands each message to the node's handler for it."""

    def __init__(self, handlers: dict[type, object]):
        self.handlers = handlers

    async def receive(self, msg, ctx):
        handler = self.handlers.get(type(msg))
        if handler is None:
            log.warning("message.unexpected", type=type(msg).__name__)
            return None
        return handler(msg)


class Node:
    """A mesh node. ``async with Node(NodeConfig(...)) as node: ...``"""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.backend = config.resolved_backend()
        self.system: ActorSystem | None = None
        self.cluster: ClusterService | None = None
        self.api: Api | None = None
        self.plan: PlanUpdate | None = None
        self.plan_ready = False
        self.fence = Fence()
        self._plan_changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.started_at = time.time()
        self.failovers: list[dict] = []
        self._leaderless_since: float | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> "Node":
        cfg = self.config
        if cfg.secret is None and cfg.host not in LOOPBACK:
            raise InsecureBind(
                f"refusing to listen on {cfg.host} without a cluster secret: anyone on the network could join. "
                "Create one with `python -m mesh secret new PATH`, copy it to every device and pass --secret-file PATH")
        secret = cfg.secret if cfg.secret is not None else default_secret(cfg.cluster)
        self.model_path = await asyncio.to_thread(models.resolve, cfg.model, fetch=True)
        self.model_config = load_config(self.model_path)
        self.tokenizer = Tokenizer.from_model(self.model_path)
        self.model_name = cfg.model if cfg.model in models.REGISTRY else Path(cfg.model).stem
        state_dir = Path(cfg.state_dir) if cfg.state_dir else models.mesh_home() / "node"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.identity = NodeIdentity.load_or_create(state_dir)
        self.node_id = self.identity.node_id
        self.fence.node = self.node_id
        if cfg.threads:  # the torch backend reads it whenever it loads a stage
            os.environ["MESH_TORCH_THREADS"] = str(cfg.threads)
        self.runner = ComputeRunner()
        self.system = ActorSystem(self.identity, secret)
        await self.system.start(cfg.host, cfg.port)
        self.stage_host = StageHost(self.node_id, self.model_path, backend=self.backend,
                                    weight_mode=cfg.weight_mode, runner=self.runner, send=self._send,
                                    max_batch=cfg.max_batch)
        self.stage_host.start()
        self.serving = Serving(self.node_id, self._send, self._plan_view,
                               eos_ids=list(self.tokenizer.eos_token_ids),
                               tokenizer_factory=lambda: IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True))
        self.coordinator = CoordinatorRole(self.node_id, self.model_name, self._profile(), self._send)
        self.system.spawn(_Inbox({
            PlanUpdate: self._on_plan_update, PlanReady: self._on_plan_ready,
            Forward: self.stage_host.on_forward, TokenOut: self.stage_host.on_token,
            Retransmit: self._on_retransmit, EndSession: self.stage_host.on_end,
        }), name=STAGE_ACTOR, mailbox_size=10_000)
        self.system.spawn(_Inbox({TokenOut: self.serving.on_token, SessionFailed: self.serving.on_failed}),
                          name=SERVE_ACTOR, mailbox_size=10_000)
        self.system.spawn(_Inbox({StageReady: self.coordinator.on_stage_ready}), name=COORD_ACTOR,
                          mailbox_size=10_000)
        self._inbox = _Inbox
        self.verify = verify_service.attach(self, audit_rate=cfg.audit_rate, fault_spec=cfg.fault)
        self.info = LocalFacts(
            name=cfg.name or platform.node() or self.node_id[:8],
            backend=self.backend,
            device=_device(self.backend),
            free_memory=cfg.memory_limit or int(psutil.virtual_memory().available * 0.8),
            speed=cfg.speed or await self.runner.run(_measure_speed),
            roles=[] if cfg.campaign else [NO_CAMPAIGN],
        )
        if cfg.api_port is not None:
            self.api = Api(self, api_key=cfg.api_key)
            self.info.api_port = await self.api.start(cfg.api_host, cfg.api_port)
            if cfg.mdns and cfg.interfaces:
                await self.api.announce(cfg.interfaces, node_id=self.node_id, name=self.info.name)
        self.cluster = ClusterService(self.system, state_dir=state_dir, facts=self.info, static_peers=cfg.peers,
                                      mdns_interfaces=cfg.interfaces if cfg.mdns else None, secret=secret,
                                      election=ElectionConfig(campaign=cfg.campaign))
        self.fence = self.cluster.fence  # durable: a higher term it accepts is saved by the election
        await self.cluster.start()
        self.system.on_peer(self._on_peer)
        self._tasks.append(asyncio.get_running_loop().create_task(self._follow_cluster(), name="follow-cluster"))
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_sessions(), name="watch-sessions"))
        self.verify.start()
        log.info("node.started", node=self.node_id, name=self.info.name, address=self.system.address,
                 api_port=self.info.api_port, backend=self.backend, model=str(self.model_path))
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.coordinator.step_down()
        if self.cluster is not None:
            await self.cluster.leave(timeout=2.0)  # a graceful leave: not treated as a failure
            await self.cluster.stop()
        if self.api is not None:
            await self.api.stop()
        self.verify.close()
        await self.stage_host.stop()
        if self.system is not None:
            await self.system.stop()
        self.runner.close()

    async def __aenter__(self) -> "Node":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- cluster ----------------------------------------------------------------------

    async def _follow_cluster(self) -> None:
        """React to the election and to membership: take or leave office, re-plan, refresh.
        Woken by every cluster event, and twice a second regardless."""
        wake = asyncio.Event()
        self.cluster.on_change(lambda event: wake.set())
        last_refresh = 0.0
        while True:
            try:
                await asyncio.wait_for(wake.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            wake.clear()
            try:
                last_refresh = self._apply_cluster_view(last_refresh)
            except Exception:  # never let one bad view stop the node from following the cluster
                log.exception("cluster.follow_failed")

    def _apply_cluster_view(self, last_refresh: float) -> float:
        self.fence.observe(self.cluster.term)
        leading = self.cluster.coordinator == self.node_id
        if leading and (not self.coordinator.active or self.coordinator.term != self.cluster.term):
            self.coordinator.take_office(self.cluster.term, self.plan)
        elif not leading and self.coordinator.active:
            self.coordinator.step_down()
        if self.coordinator.active:
            self.coordinator.set_members(self._capacities())
            now = time.monotonic()
            if now - last_refresh > 2.0:
                self.coordinator.refresh()
                return now
        return last_refresh

    async def _watch_sessions(self) -> None:
        """Replay stalled sessions; stop serving when cut off from the majority."""
        while True:
            await asyncio.sleep(0.5)
            if self._leaderless_for() > self.config.leaderless_grace_s and self.plan_ready:
                # A minority side must not keep serving on its last plan: it cannot fence,
                # re-plan or heal. It serves again when a coordinator re-sends the plan.
                log.warning("node.cut_off", seconds=round(self._leaderless_for(), 1))
                self.plan_ready = False
                self._notify_plan()
                self.serving.fail_all(Unavailable(_LEADERLESS))
            self.serving.check_stalls()

    def _on_peer(self, event) -> None:
        if not event.up:
            self.serving.links_lost += 1

    def _leaderless_for(self) -> float:
        if self.cluster is None or self.cluster.coordinator is not None:
            self._leaderless_since = None
            return 0.0
        if self._leaderless_since is None:
            self._leaderless_since = time.monotonic()
        return time.monotonic() - self._leaderless_since

    def _capacities(self) -> list[NodeCapacity]:
        # A suspect node keeps its place until it is declared dead: no re-plan on a hiccup.
        return [NodeCapacity(m.node_id, m.free_memory, m.speed, m.backend)
                for m in self.cluster.members() if m.state in ("alive", "suspect") and m.backend]

    def _profile(self) -> ModelProfile:
        c = self.model_config
        kv = c.n_kv_heads * c.head_dim
        layer_params = 2 * c.hidden * c.hidden + 2 * c.hidden * kv + 3 * c.hidden * c.intermediate + 2 * c.hidden
        embed = c.vocab_size * c.hidden
        bytes_per = 4 if self.config.weight_mode == "float32" else 1
        return ModelProfile(n_layers=c.n_layers, layer_bytes=layer_params * bytes_per, embed_bytes=embed * 4,
                            head_bytes=(embed if c.tie_embeddings else embed) * bytes_per + c.hidden * 4)

    # -- pipeline messages ------------------------------------------------------------

    def _send(self, node: str, actor: str, msg: object) -> None:
        try:
            self.system.ref(node, actor).tell(msg)
        except Exception as exc:  # an unreachable peer: the failure detector will act on it
            log.debug("send.failed", to=node, actor=actor, type=type(msg).__name__, error=str(exc))

    def _on_plan_update(self, update: PlanUpdate) -> None:
        if not self.fence.check(update.term, src=update.coordinator, command="PlanUpdate"):
            return
        epoch = (update.term, update.version)
        current = (self.plan.term, self.plan.version) if self.plan is not None else (0, 0)
        if epoch < current:
            return
        if epoch > current:
            self.plan = update
            self.plan_ready = False
            self.failovers = list(update.failovers)
            self._notify_plan()
            if update.error:
                self.serving.fail_all(Unavailable(update.error))
        if update.error:
            return

        async def load() -> None:  # also answers a re-sent plan, once its load is done
            ready = await self.stage_host.apply_plan(update)
            self._send(update.coordinator, COORD_ACTOR, ready)

        task = asyncio.get_running_loop().create_task(load(), name="apply-plan")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    def _notify_plan(self) -> None:
        self._plan_changed.set()
        self._plan_changed = asyncio.Event()

    def _on_plan_ready(self, msg: PlanReady) -> None:
        if not self.fence.check(msg.term, command="PlanReady"):
            return
        if self.plan is None or (msg.term, msg.version) != (self.plan.term, self.plan.version) or self.plan_ready:
            return
        self.plan_ready = True
        log.info("plan.serving", epoch=(msg.term, msg.version),
                 stages=[(s.node[:8], s.start, s.end) for s in self.plan.stages])
        self._notify_plan()
        self.serving.on_plan_ready()
        self.verify.on_plan_ready(self.plan)

    def _on_retransmit(self, msg: Retransmit) -> None:
        self.stage_host.on_retransmit(msg)
        self.serving.on_retransmit(msg)

    def _plan_view(self) -> PlanView | None:
        if self.plan is None or not self.plan_ready or not self.plan.stages:
            return None
        return PlanView(self.plan.term, self.plan.version, [s.node for s in self.plan.stages])

    # -- serving ----------------------------------------------------------------------

    async def wait_ready(self, timeout: float = 120.0, stages: int | None = None) -> None:
        """Wait until a plan (with ``stages`` stages, if given) is loaded and serving."""
        deadline = time.monotonic() + timeout
        while not (self.plan_ready and (stages is None or len(self.plan.stages) == stages)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(self._unavailable_reason(timeout))
            try:
                await asyncio.wait_for(self._plan_changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _unavailable_reason(self, waited: float) -> str:
        if self.plan is not None and self.plan.error:
            return self.plan.error
        if self.cluster is None or self.cluster.coordinator is None:
            return f"no coordinator after {waited:.0f}s: the cluster has no majority of its voters online"
        return f"no pipeline ready after {waited:.0f}s"

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def generate_stream(self, prompt_ids: list[int], params: GenerationParams,
                              *, wait_s: float = 60.0) -> AsyncIterator[TokenEvent]:
        params.validate(prompt_len=len(prompt_ids), context_length=self.model_config.context_length)
        if self.plan is not None and self.plan.error:
            raise Unavailable(self.plan.error)
        deadline = time.monotonic() + self.config.leaderless_grace_s
        while self.cluster.coordinator is None:  # an election takes about a second; a cut-off lasts
            if time.monotonic() > deadline:
                raise Unavailable(_LEADERLESS)
            await asyncio.sleep(0.1)
        await self.wait_ready(timeout=wait_s)
        async for event in self.serving.generate(prompt_ids, params):
            yield event

    async def generate(self, prompt: str, *, chat: bool = True, **params) -> AsyncIterator[TokenEvent]:
        """Stream the answer to ``prompt`` (a user message, or raw text with ``chat=False``)."""
        ids = self.encode_chat([{"role": "user", "content": prompt}]) if chat else self.encode_text(prompt)
        async for event in self.generate_stream(ids, GenerationParams(**params)):
            yield event

    async def chat(self, messages: list[dict], **params) -> AsyncIterator[TokenEvent]:
        async for event in self.generate_stream(self.encode_chat(messages), GenerationParams(**params)):
            yield event

    # -- views ------------------------------------------------------------------------

    def status(self) -> dict:
        members = self.cluster.members() if self.cluster is not None else []
        roles: dict[str, list[str]] = {}
        if self.plan is not None:
            for s in self.plan.stages:
                roles.setdefault(s.node, []).append(f"stage{s.index}")
        coordinator = self.cluster.coordinator if self.cluster is not None else None
        if coordinator:
            roles.setdefault(coordinator, []).append("coordinator")
        nodes = []
        for m in members:
            nodes.append({
                "id": m.node_id, "name": m.name, "address": f"{m.address[0]}:{m.address[1]}" if m.address else None,
                "api_port": m.api_port, "backend": m.backend, "device": m.device, "free_memory": m.free_memory,
                "speed": m.speed, "state": m.state, "voter": m.voter, "roles": roles.get(m.node_id, []),
            })
        plan = None
        if self.plan is not None:
            plan = {"term": self.plan.term, "version": self.plan.version, "ready": self.plan_ready,
                    "error": self.plan.error or None,
                    "stages": [{"index": s.index, "node": s.node, "layers": [s.start, s.end], "backend": s.backend}
                               for s in self.plan.stages]}
        return {"self": self.node_id, "name": self.info.name, "coordinator": coordinator,
                "term": self.cluster.term if self.cluster is not None else 0, "nodes": nodes, "plan": plan,
                "model": self.model_name, "failovers": self.failovers, "verification": self.verification(),
                "stage": self._stage_stats()}

    def verification(self) -> dict:
        return self.verify.verification()

    def _stage_stats(self) -> dict:
        s = self.stage_host.stats
        return {"steps": s.steps, "batches": s.batches, "tokens_sampled": s.tokens_sampled,
                "digest_mismatches": s.digest_mismatches, "retransmits": s.retransmits_sent,
                "busy_s": round(s.busy_s, 3), "compute_s": round(s.compute_s, 3),
                "cpu_s": round(s.cpu_s, 3), "runq_s": self.runner.runq_s(), "sessions": len(self.stage_host.meta)}

    def mesh_info(self) -> dict:
        pipeline = [] if self.plan is None else [
            {"node": s.node, "layers": [s.start, s.end], "backend": s.backend} for s in self.plan.stages]
        return {"node": self.node_id, "coordinator": self.cluster.coordinator if self.cluster else None,
                "term": self.cluster.term if self.cluster else 0, "pipeline": pipeline,
                "verification": self.verification(), "failovers": self.failovers}

    def metrics_text(self) -> str:
        s = self.stage_host.stats
        lines = [
            "# TYPE mesh_tokens_served_total counter", f"mesh_tokens_served_total {self.serving.tokens_out}",
            "# TYPE mesh_sessions_completed_total counter",
            f"mesh_sessions_completed_total {self.serving.completed}",
            "# TYPE mesh_sessions_active gauge", f"mesh_sessions_active {len(self.serving.sessions)}",
            "# TYPE mesh_stage_steps_total counter", f"mesh_stage_steps_total {s.steps}",
            "# TYPE mesh_stage_batches_total counter", f"mesh_stage_batches_total {s.batches}",
            "# TYPE mesh_stage_busy_seconds_total counter", f"mesh_stage_busy_seconds_total {s.busy_s:.6f}",
            "# TYPE mesh_tokens_sampled_total counter", f"mesh_tokens_sampled_total {s.tokens_sampled}",
            "# TYPE mesh_digest_mismatches_total counter", f"mesh_digest_mismatches_total {s.digest_mismatches}",
            "# TYPE mesh_failovers_total counter", f"mesh_failovers_total {len(self.failovers)}",
            "# TYPE mesh_term gauge", f"mesh_term {self.cluster.term if self.cluster else 0}",
            "# TYPE mesh_is_coordinator gauge", f"mesh_is_coordinator {int(self.coordinator.active)}",
        ]
        v = self.verification()
        lines += ["# TYPE mesh_audits_total counter", f"mesh_audits_total {v['audits']}",
                  "# TYPE mesh_audit_failures_total counter", f"mesh_audit_failures_total {v['audit_failures']}"]
        return "\n".join(lines) + "\n"


def _device(backend: str) -> str:
    if backend == "mlx":
        return "metal" if platform.system() == "Darwin" else "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _measure_speed() -> float:
    """A coarse, stable speed score (matrix-vector GFLOP/s, rounded to a power of 1.25)
    so nodes of the same kind get equal shares despite timing noise."""
    import math

    import numpy as np

    w = np.random.default_rng(0).standard_normal((1536, 576), dtype=np.float32)
    x = np.ones((576,), dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            w @ x
        best = min(best, time.perf_counter() - t)
    gflops = 20 * 2 * w.size / best / 1e9
    return round(1.25 ** round(math.log(max(gflops, 1e-3), 1.25)), 3)


def memory_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    units = {"k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20, "g": 1e9, "gb": 1e9,
             "gib": 1 << 30, "": 1}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in units or not num:
        raise ValueError(f"{text!r} is not a size like 2GiB or 512MiB")
    return int(float(num) * units[unit])

