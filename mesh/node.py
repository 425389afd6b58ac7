"""The Node: the one object an application embeds, and what `mesh join` runs.

Composition only. It builds an actor system on the transport it is given (TCP by
default), the cluster service (discovery, membership, failure detection, election), the
pipeline roles (this node's stage, the sessions it serves and, while elected, the
coordinator), verification and the HTTP API, and routes the messages each one handles.
Every part reads time from the one clock it is given. The plan lives in one
`PlanState`. Model compute runs on a ComputeRunner thread; the event loop only moves
messages, so heartbeats and elections keep running during a long prefill.

    Node(config)                                       # TCP, the real clock, a compute thread
    Node(config, transport=net.transport("a"), clock=clock, runner=InlineRunner())  # tests
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import platform
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable

import psutil
import structlog

from actors import Actor, ActorSystem, NodeIdentity
from actors import statefiles as state_files
from actors.clock import LOOP_CLOCK, Clock
from actors.transport.base import Transport
from kernels.config import load_config
from kernels.runner import ComputeRunner
from kernels.tokenizer import IncrementalDetokenizer, Tokenizer
from kernels.tokenizer.chat_template import ChatTemplateError, ChatTemplateMissing
from mesh import binding, models, sizing, views
from mesh.http.app import Api
from mesh.http.guard import ApiPolicy
from mesh.cluster.admission import Admission
from mesh.cluster.election import ElectionConfig
from mesh.cluster.service import FORGET_DEAD_AFTER_S, NO_CAMPAIGN, ClusterService, LocalFacts, Member
from mesh.errors import BadRequest, MeshError, Unavailable
from mesh.generation import GenerationParams, TokenEvent
from mesh.pipeline.coordinator import CoordinatorRole
from mesh.pipeline.load_deadline import LoadDeadline
from mesh.pipeline.messages import (
    EndSession,
    Forward,
    PlanReady,
    PlanUpdate,
    Retransmit,
    SessionFailed,
    StageReady,
    StepLost,
    TokenOut,
)
from mesh.pipeline.plan import Offer, PlanState
from mesh.pipeline.serving import Serving
from mesh.secret_files import loopback_secret
from mesh.pipeline.stage_host import COORD_ACTOR, SERVE_ACTOR, STAGE_ACTOR, StageHost, StageObserver
from mesh.planner import NodeCapacity
from mesh.verify.recorder import VERIFY_ACTOR
from mesh.verify.service import VerifyConfig, VerifyService

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
    api_policy: ApiPolicy = field(default_factory=ApiPolicy)  # allowed hosts/origins, API limits and timeouts
    interfaces: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    mdns: bool = True
    backend: str = "auto"
    weight_mode: str = "float32"
    name: str | None = None
    state_dir: Path | None = None
    memory_limit: int | None = None  # bytes offered for layers and their KV caches (0: none, the node only
    # votes and serves clients); default: 80% of available RAM
    kv_sessions: int = 4  # the plan reserves KV cache for this many concurrent sessions per stage ...
    kv_context: int = 2048  # ... of this many tokens each (capped at the model's context); the coordinator's count
    threads: int | None = None
    speed: float | None = None  # speed score for the planner; default: measured on the model's layer at start
    max_batch: int = 16
    campaign: bool = True  # False: vote, but never become coordinator (e.g. a node that serves clients)
    admit: str = "auto"  # who may join: auto | ask (a member approves: `mesh admit`) | pinned (admit_keys)
    admit_keys: list[str] = field(default_factory=list)  # node ids admitted with admit="pinned"
    max_voters: int = 3  # seats with a vote, by seniority; later members replicate without one
    forget_dead_after_s: float = FORGET_DEAD_AFTER_S  # a member dead this long is removed (it may join again)
    # how long a stage may take to load before the coordinator plans around it, and the back-off after
    load_deadline: LoadDeadline = field(default_factory=LoadDeadline)
    leaderless_grace_s: float = 3.0  # without a coordinator this long, stop serving (cut off from the majority)
    verify: VerifyConfig = field(default_factory=VerifyConfig)  # commitments, audits, test-only faults

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "mlx" if platform.system() == "Darwin" and platform.machine() == "arm64" else "torch"


@dataclass(frozen=True)
class WithPeer:
    """A route whose handler is also told the authenticated peer that sent the message
    (None: sent on this node), for a check only the handler can make."""

    handler: Callable[[Any, str | None], Any]


def placeable(members: Iterable[Member]) -> list[NodeCapacity]:
    """The nodes the coordinator may give layers (and audits) to: admitted members only
    (voters and learners). Any key that holds the cluster secret can heartbeat, and a
    heartbeat is only its claim; a key that merely heartbeats (never joined, pending in
    ask mode, or refused) claiming a large, fast machine would otherwise get the layers,
    and the plan would wait for it forever (or route every prompt through it). A suspect
    node keeps its place until it is declared dead: no re-plan on a hiccup. A member whose
    speed or memory is not a plausible number (a heartbeat may carry any value) is not
    placed: it cannot stop the plan."""
    return [NodeCapacity(m.node_id, m.free_memory, m.speed, m.backend, m.host_id)
            for m in members if m.member and m.state in ("alive", "suspect") and m.backend
            and _plausible(m.speed, m.free_memory)]


def _plausible(speed: object, free_memory: object) -> bool:
    return (type(speed) in (int, float) and math.isfinite(speed) and speed > 0
            and type(free_memory) is int and free_memory >= 0)


class _Inbox(Actor):
    """A thin actor that hands each message to the handler for its type."""

    def __init__(self, handlers: dict[type, Callable[[Any], Any] | WithPeer],
                 guard: Callable[[Any, str | None], bool] | None = None):
        self.handlers = handlers
        self.guard = guard

    async def receive(self, msg, ctx):
        handler = self.handlers.get(type(msg))
        if handler is None:
            log.warning("message.unexpected", type=type(msg).__name__)
            return None
        if self.guard is not None and not self.guard(msg, ctx.peer):
            return None
        result = handler.handler(msg, ctx.peer) if isinstance(handler, WithPeer) else handler(msg)
        if inspect.isawaitable(result):  # a handler that answers later (an ask waits for it)
            result = await result
        return result


class Node:
    """A mesh node. ``async with Node(NodeConfig(...)) as node: ...``

    ``transport``: how it reaches peers (default TCP); ``clock``: where it reads time
    (default the event loop's); ``runner``: where model compute runs (default a thread
    of its own); ``audit_compute``: where audit passes run (default a low-priority
    child process); ``seed``: fixes the election's and the redial's randomness."""

    def __init__(self, config: NodeConfig, *, transport: Transport | None = None, clock: Clock = LOOP_CLOCK,
                 runner: Any = None, audit_compute: Any = None, seed: int | None = None):
        self.config = config
        self.backend = config.resolved_backend()
        self.transport = transport
        self.clock = clock
        self.runner = runner
        self._audit_compute = audit_compute
        self.seed = seed
        self.system: ActorSystem | None = None
        self.cluster: ClusterService | None = None
        self.forged: dict[str, int] = {}  # refused messages (mesh.binding) by type
        self.api: Api | None = None
        self.plan = PlanState()
        self._tasks: list[asyncio.Task] = []
        self.started_at = clock.wall()
        self._leaderless_since: float | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> "Node":
        cfg = self.config
        if cfg.secret is None and cfg.host not in LOOPBACK:
            raise InsecureBind(
                f"refusing to listen on {cfg.host} without a cluster secret: anyone on the network could join. "
                "Create one with `python -m mesh secret new PATH`, copy it to every device and pass --secret-file PATH")
        admission = Admission(cfg.admit, cfg.admit_keys)  # a bad --admit-key fails before the model loads
        if cfg.max_voters < 1:
            raise ValueError("max_voters must be at least 1")
        self.model_path = await asyncio.to_thread(models.resolve, cfg.model, fetch=True)
        self.model_config = load_config(self.model_path)
        self.tokenizer = Tokenizer.from_model(self.model_path)
        self.model_name = cfg.model if cfg.model in models.REGISTRY else Path(cfg.model).stem
        if cfg.kv_sessions < 1 or cfg.kv_context < 1:
            raise ValueError("kv_sessions and kv_context must be at least 1")
        profile = sizing.model_profile(self.model_config, cfg.weight_mode, kv_sessions=cfg.kv_sessions,
                                       kv_context=cfg.kv_context)
        if cfg.memory_limit is not None:  # before anything listens: a budget that cannot work is a clear error
            sizing.check_budget(cfg.memory_limit, profile, psutil.virtual_memory().total)
        state_dir = state_files.state_dir(Path(cfg.state_dir) if cfg.state_dir else models.mesh_home() / "node")
        secret = cfg.secret
        if secret is None:  # loopback only (checked above): a random secret of this state dir, never a fixed one
            secret, path, created = loopback_secret(state_dir)
            log.info("node.loopback_secret", path=str(path), created=created,
                     hint=f"other nodes on this machine join with --secret-file {path}")
        self.identity = NodeIdentity.load_or_create(state_dir)
        self.node_id = self.identity.node_id
        if cfg.threads:  # the torch backend reads it whenever it loads a stage
            os.environ["MESH_TORCH_THREADS"] = str(cfg.threads)
        if self.runner is None:
            self.runner = ComputeRunner()
        rng = random.Random(self.seed) if self.seed is not None else None
        self.system = ActorSystem(self.identity, secret, self.transport, clock=self.clock, rng=rng)
        await self.system.start(cfg.host, cfg.port)
        self.coordinator = CoordinatorRole(self.node_id, self.model_name, profile, self._send,
                                           load_deadline=cfg.load_deadline, clock=self.clock)
        self.verify = VerifyService(
            self.identity, self.model_path, backend=self.backend, weight_mode=cfg.weight_mode, send=self._send,
            ask=self._ask, coordinator=lambda: self.cluster.coordinator if self.cluster is not None else None,
            members=lambda: {c.node_id: c.backend for c in self._capacities()}, role=self.coordinator,
            stage_idle_s=lambda: self.clock.now() - self.stage_host.stats.last_step_at, config=cfg.verify,
            clock=self.clock, audit_compute=self._audit_compute)
        self.stage_host = StageHost(self.node_id, self.model_path, backend=self.backend,
                                    weight_mode=cfg.weight_mode, runner=self.runner, send=self._send,
                                    max_batch=cfg.max_batch, clock=self.clock, observer=self.stage_observer())
        self.stage_host.start()
        self.serving = Serving(self.node_id, self._send, self.plan.serving_view,
                               eos_ids=list(self.tokenizer.eos_token_ids), clock=self.clock,
                               session_ids=self._session_ids(),
                               tokenizer_factory=lambda: IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True))
        self._spawn_inboxes()
        if cfg.speed:
            speed, speed_source = cfg.speed, "configured (--speed)"
        else:
            speed, speed_source = await self.runner.run(sizing.measure_speed, self.model_path, self.backend,
                                                         cfg.weight_mode)
        log.info("node.speed", score=speed, source=speed_source)
        self._measured_source = f"{speed} layers/s, {speed_source}"
        self.info = LocalFacts(
            name=cfg.name or platform.node() or self.node_id[:8],
            backend=self.backend,
            device=sizing.device(self.backend),
            free_memory=(cfg.memory_limit if cfg.memory_limit is not None
                         else int(psutil.virtual_memory().available * 0.8)),
            speed=speed,
            roles=[] if cfg.campaign else [NO_CAMPAIGN],
            host_id=sizing.host_id(),
            speed_source=speed_source,
        )
        if cfg.api_port is not None:
            self.api = Api(self, api_key=cfg.api_key, policy=cfg.api_policy,
                           hosts=[cfg.host, cfg.api_host, *cfg.interfaces])
            self.info.api_port = await self.api.start(cfg.api_host, cfg.api_port)
            if cfg.mdns and cfg.interfaces:
                await self.api.announce(cfg.interfaces, identity=self.identity, name=self.info.name)
        self.cluster = ClusterService(self.system, state_dir=state_dir, facts=self.info, static_peers=cfg.peers,
                                      mdns_interfaces=cfg.interfaces if cfg.mdns else None, secret=secret,
                                      election=ElectionConfig(campaign=cfg.campaign, max_voters=cfg.max_voters),
                                      clock=self.clock, seed=self.seed, forget_dead_after=cfg.forget_dead_after_s,
                                      admission=admission)
        self.plan.fence = self.cluster.fence  # durable: a higher term it accepts is saved by the election
        self.plan.fence.node = self.node_id
        await self.cluster.start()
        self.system.on_peer(self._on_peer)
        self._spawn_task(self._follow_cluster(), "follow-cluster")
        self._spawn_task(self._watch_sessions(), "watch-sessions")
        self.verify.start()
        log.info("node.started", node=self.node_id, name=self.info.name, address=self.system.address,
                 api_port=self.info.api_port, backend=self.backend, model=str(self.model_path))
        return self

    def stage_observer(self) -> StageObserver | None:
        """What watches this node's stage: verification's recorder, or nothing with
        verification off. A subclass may wrap it (a test's wire faults do)."""
        return self.verify.observer

    def routes(self) -> dict[str, dict[type, Callable[[Any], Any] | WithPeer]]:
        """The actors peers address, and which part handles each message they take. A
        subclass may replace handlers (a test's rogue node does)."""
        return {
            STAGE_ACTOR: {PlanUpdate: self._on_plan_update, PlanReady: self._on_plan_ready,
                          Forward: self.stage_host.on_forward, TokenOut: self.stage_host.on_token,
                          Retransmit: WithPeer(self._on_retransmit), EndSession: WithPeer(self._on_end)},
            SERVE_ACTOR: {TokenOut: self.serving.on_token, SessionFailed: self.serving.on_failed,
                          StepLost: self.serving.on_step_lost},
            COORD_ACTOR: {StageReady: self.coordinator.on_stage_ready},
            VERIFY_ACTOR: self.verify.handlers(),
        }

    def _bound(self, msg: Any, peer: str | None) -> bool:
        """Whether ``msg`` is believed coming from the authenticated ``peer`` (mesh.binding);
        a refusal is logged with the peer id and counted, and the node keeps serving."""
        cluster = self.cluster
        view = binding.View(self.node_id, cluster.term if cluster is not None else 0,
                            cluster.coordinator if cluster is not None else None, self.plan.update,
                            fetchers=lambda fetch: self.verify.fetchers(fetch, peer), serve_node=self._serve_node)
        reason = binding.refusal(msg, peer, view)
        if reason is None:
            return True
        self._refused(msg, peer, reason)
        return False

    def _refused(self, msg: Any, peer: str | None, reason: str) -> None:
        kind = type(msg).__name__
        self.forged[kind] = self.forged.get(kind, 0) + 1
        log.warning("link.forged", node=self.node_id, peer=peer, type=kind, reason=reason)

    def _serve_node(self, session: str) -> str | None:
        """The node serving ``session``, if this node knows: itself, or what its stage was told."""
        if session in self.serving.sessions:
            return self.node_id
        meta = self.stage_host.meta.get(session)
        return meta.serve_node if meta is not None else None

    def _session_ids(self) -> Callable[[], str]:
        if self.seed is None:
            return lambda: uuid.uuid4().hex
        # the start time too: a node restarted with the same seed must not reuse its session ids
        rng = random.Random(f"sessions {self.seed} {self.clock.wall()}")
        return lambda: f"{rng.getrandbits(128):032x}"

    def _spawn_inboxes(self) -> None:
        for name, handlers in self.routes().items():
            self.system.spawn(_Inbox(handlers, self._bound), name=name, mailbox_size=10_000)

    async def stop(self, *, graceful: bool = True) -> None:
        """Stop the node; ``graceful``: leave the cluster first (the others do not treat it
        as a failure). ``graceful=False`` is a crash as the others see it (tests)."""
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.coordinator.step_down()
        if self.cluster is not None:
            if graceful:
                await self.cluster.leave(timeout=2.0)
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

    def _spawn_task(self, coro, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    # -- cluster ----------------------------------------------------------------------

    async def _follow_cluster(self) -> None:
        """React to the election and to membership: take or leave office, re-plan, refresh.
        Woken by every cluster event, and twice a second regardless."""
        wake = asyncio.Event()
        self.cluster.on_change(lambda event: wake.set())
        last_refresh = float("-inf")
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
        self.plan.fence.observe(self.cluster.term)
        leading = self.cluster.coordinator == self.node_id
        if leading and (not self.coordinator.active or self.coordinator.term != self.cluster.term):
            self.coordinator.take_office(self.cluster.term, self.plan.update)
        elif not leading and self.coordinator.active:
            self.coordinator.step_down()
        if self.coordinator.active:
            self.coordinator.set_members(self._capacities())
            now = self.clock.now()
            if now - last_refresh > 2.0:
                self.coordinator.refresh()
                return now
        return last_refresh

    async def _watch_sessions(self) -> None:
        """Replay stalled sessions; stop serving when cut off from the majority."""
        while True:
            await self.clock.sleep(0.5)
            if self._leaderless_for() > self.config.leaderless_grace_s and self.plan.suspend():
                # A minority side must not keep serving on its last plan: it cannot fence,
                # re-plan or heal. It serves again when a coordinator re-sends the plan.
                log.warning("node.cut_off", seconds=round(self._leaderless_for(), 1))
                self.serving.fail_all(Unavailable(_LEADERLESS))
            self.serving.check_stalls()
            self._refine_speed()

    def _refine_speed(self) -> None:
        """Heartbeat the score this node's stage shows in its own decode steps (a stated
        --speed stays). It is used by the next plan; it does not start one."""
        if self.config.speed:
            return
        s = self.stage_host.stats
        refined = sizing.observed_speed(s.decode_layers, s.decode_best_s, s.decode_samples, self._measured_source)
        if refined is not None:
            self.info.speed, self.info.speed_source = refined

    def _on_peer(self, event) -> None:
        if not event.up:
            self.serving.links_lost += 1

    def _leaderless_for(self) -> float:
        if self.cluster is None or self.cluster.coordinator is not None:
            self._leaderless_since = None
            return 0.0
        if self._leaderless_since is None:
            self._leaderless_since = self.clock.now()
        return self.clock.now() - self._leaderless_since

    def _capacities(self) -> list[NodeCapacity]:
        return placeable(self.cluster.members())

    # -- pipeline messages ------------------------------------------------------------

    def _send(self, node: str, actor: str, msg: object) -> bool:
        """Tell ``msg`` to an actor on ``node``; False if it was dropped (no link to that
        node, or a full or closed one): the failure detector acts on a dead peer."""
        if not self.system.is_connected(node):
            log.debug("send.dropped", to=node, actor=actor, type=type(msg).__name__, reason="no link")
            return False
        try:
            self.system.ref(node, actor).tell(msg)
        except Exception as exc:
            log.debug("send.dropped", to=node, actor=actor, type=type(msg).__name__, error=str(exc))
            return False
        return True

    async def _ask(self, node: str, actor: str, msg: object, timeout: float) -> Any:
        return await self.system.ref(node, actor).ask(msg, timeout=timeout)

    def _on_plan_update(self, update: PlanUpdate) -> None:
        offer = self.plan.offer(update)
        if offer is Offer.REFUSED:
            return
        if offer is Offer.NEW and update.error:
            self.serving.fail_all(Unavailable(update.error))
        if update.error:
            return

        async def load() -> None:  # also answers a re-sent plan, once its load is done
            ready = await self.stage_host.apply_plan(update)
            self._send(update.coordinator, COORD_ACTOR, ready)

        self._spawn_task(load(), "apply-plan")

    def _on_plan_ready(self, msg: PlanReady) -> None:
        if not self.plan.mark_ready(msg):
            return
        log.info("plan.serving", epoch=str(self.plan.epoch),
                 stages=[(s.node[:8], s.start, s.end) for s in self.plan.update.stages])
        self.serving.on_plan_ready()
        self.verify.on_plan_ready(self.plan.update)

    def _on_retransmit(self, msg: Retransmit, peer: str | None) -> None:
        self.stage_host.on_retransmit(msg, peer)
        self.serving.on_retransmit(msg, peer)

    def _on_end(self, msg: EndSession, peer: str | None) -> None:
        reason = self.stage_host.on_end(msg, peer)
        if reason is not None:
            self._refused(msg, peer, reason)

    # -- serving ----------------------------------------------------------------------

    async def wait_ready(self, timeout: float = 120.0, stages: int | None = None) -> None:
        """Wait until a plan (with ``stages`` stages, if given) is loaded and serving."""
        deadline = self.clock.now() + timeout
        while not (self.plan.ready and (stages is None or len(self.plan.update.stages) == stages)):
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                raise Unavailable(self._unavailable_reason(timeout))
            await self.plan.wait_changed(remaining)

    def _unavailable_reason(self, waited: float) -> str:
        if self.plan.error:
            return self.plan.error
        if self.cluster is None or self.cluster.coordinator is None:
            return f"no coordinator after {waited:.0f}s: the cluster has no majority of its voters online"
        return f"no pipeline ready after {waited:.0f}s"

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A conversation's ids through the model's chat template; a base model (no
        template) or a conversation the template refuses is a `BadRequest`."""
        try:
            return self.tokenizer.encode_chat(messages)
        except (ChatTemplateMissing, ChatTemplateError) as exc:
            raise BadRequest(str(exc)) from None

    def encode_text(self, text: str) -> list[int]:
        """A raw completion prompt's ids, with the BOS the model asks for (Gemma's)."""
        return self.tokenizer.encode_prompt(text)

    async def generate_stream(self, prompt_ids: list[int], params: GenerationParams,
                              *, wait_s: float = 60.0) -> AsyncIterator[TokenEvent]:
        params.validate(prompt_len=len(prompt_ids), context_length=self.model_config.context_length)
        if self.plan.error:
            raise Unavailable(self.plan.error)
        deadline = self.clock.now() + self.config.leaderless_grace_s
        while self.cluster.coordinator is None:  # an election takes about a second; a cut-off lasts
            if self.clock.now() > deadline:
                raise Unavailable(_LEADERLESS)
            await self.clock.sleep(0.1)
        await self.wait_ready(timeout=wait_s)
        async for event in self.serving.generate(prompt_ids, params):
            yield event

    async def generate(self, prompt: str, *, chat: bool = True, **params) -> AsyncIterator[TokenEvent]:
        """Stream the answer to ``prompt`` (a user message, or raw text with ``chat=False``);
        ``params`` are `GenerationParams.create`'s (max_tokens, temperature, top_p, top_k, seed)."""
        ids = self.encode_chat([{"role": "user", "content": prompt}]) if chat else self.encode_text(prompt)
        async for event in self.generate_stream(ids, GenerationParams.create(**params)):
            yield event

    async def chat(self, messages: list[dict], **params) -> AsyncIterator[TokenEvent]:
        async for event in self.generate_stream(self.encode_chat(messages), GenerationParams.create(**params)):
            yield event

    # -- views ------------------------------------------------------------------------

    @property
    def failovers(self) -> list[dict]:
        return self.plan.failovers

    def status(self) -> dict:
        return views.status(self)

    async def admit(self, prefix: str) -> str:
        """Approve the pending key starting with `prefix` (`mesh admit`); its node id."""
        if self.cluster is None:
            raise Unavailable("this node has not joined a cluster yet")
        return await self.cluster.admit(prefix)

    def verification(self) -> dict:
        return self.verify.verification()

    def mesh_info(self) -> dict:
        return views.mesh_info(self)

    def metrics_text(self) -> str:
        return views.metrics_text(self)
