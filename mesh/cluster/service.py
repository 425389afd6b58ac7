"""ClusterService: the asyncio adapter that runs the sans-IO cluster parts on a real clock.

    service = ClusterService(system, state_dir=..., name="laptop", static_peers=["10.0.0.2:7946"],
                             mdns_interfaces=["192.168.1.10"], secret=secret)
    await service.start()
    service.coordinator, service.term, service.members(), service.fence
    async for event in service.events(): ...   # "coordinator" / "member" changes
    await service.leave(); await service.stop()

It ticks the `Election` every `tick` seconds and sends its messages as actor messages
(to the actor named "cluster" on each node), sends a `Heartbeat` to every connected
peer every `heartbeat` seconds and feeds the phi-accrual `FailureDetector`, and turns
discovery hints (mDNS or `--peer`) into `system.connect`. Discovery is only a hint:
a peer is a member once it is in the committed configuration, which only changes
through the coordinator over the authenticated transport.

Dead voters: every tick the election learns which voters the detector declares dead; a
coordinator removes one that stays dead for `remove_dead_after` seconds (a single-server
change), and the seat goes to the most senior live member without a vote, so the
cluster keeps a majority for the next failure. A removed node that comes back is a
member without a vote until a seat frees.

Admission: a key that is not a member asks the coordinator to admit it; the `Admission`
rule (auto | ask | pinned, mesh/cluster/admission.py) decides. `admit(prefix)` approves
a waiting key from any member: the approval travels to the coordinator as an
`AdmitRequest` over the authenticated link, and is refused from a non-member.

Bootstrap of a new home cluster: a node with no persisted state waits `bootstrap_after`
seconds for peers. If one of them is already part of a cluster, it asks to join. If
none is and its own id is the lowest among the new nodes it sees, it founds a cluster
of itself alone; the others then join it one at a time. The decision is the pure
`Bootstrap` (mesh/cluster/bootstrap.py); this service feeds it the heartbeats and the
detector's verdicts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from actors import Actor, ActorSystem, PeerEvent
from actors.clock import LOOP_CLOCK, Clock

from mesh.cluster.admission import Admission, AdmissionError
from mesh.cluster.bootstrap import Bootstrap, Decision, Peer
from mesh.cluster.detector import DetectorConfig, FailureDetector, Liveness
from mesh.cluster.discovery import MdnsDiscovery, PeerHint, parse_peer
from mesh.cluster.election import Election, ElectionConfig, Outbox, Role
from mesh.cluster.bounds import ImplausibleMessage, check_message
from mesh.cluster.fence import Fence
from mesh.cluster.hints import HintTable
from mesh.cluster.persistence import FileStorage, MemoryStorage, Storage
from mesh.cluster.wire import AdmitRequest, Heartbeat, RaftWire, from_wire, to_wire

log = structlog.get_logger("mesh.cluster.service")

ACTOR_NAME = "cluster"
# A member without a vote that has been dead this long is removed from the members (a
# week: a laptop away for a weekend keeps its place; a reinstalled device's old key goes).
FORGET_DEAD_AFTER_S = 7 * 24 * 3600.0
NO_CAMPAIGN = "no-campaign"  # a role in heartbeats: this node votes but never leads or founds


@dataclass(frozen=True)
class Member:
    node_id: str
    name: str = ""
    address: tuple[str, int] | None = None
    backend: str = ""
    device: str = ""
    free_memory: int = 0
    state: str = "alive"  # alive | suspect | dead | left
    roles: tuple[str, ...] = ()
    voter: bool = False
    speed: float = 1.0
    api_port: int = 0
    member: bool = False  # admitted by key (in the committed configuration); only members get stages
    host_id: str = ""  # the machine it runs on, as it claims (mesh.sizing.host_id)
    speed_source: str = ""  # how its speed score was obtained, as it claims


@dataclass(frozen=True)
class ClusterEvent:
    """`kind` is "coordinator" (the coordinator or term changed: `node_id` is the new
    coordinator or None) or "member" (`node_id` moved to `state`)."""

    kind: str
    node_id: str | None
    term: int
    state: str = ""


@dataclass
class LocalFacts:
    name: str = ""
    backend: str = ""
    device: str = ""
    free_memory: int = 0
    roles: list[str] = field(default_factory=list)
    speed: float = 1.0
    api_port: int = 0
    host_id: str = ""
    speed_source: str = ""


def _short(text: object, limit: int = 64) -> str:
    """A peer's free-text claim as the views show it: a string, cut to ``limit``."""
    return text[:limit] if isinstance(text, str) else ""


class EventStream:
    """An async iterator of `ClusterEvent`s; keeps the latest 1000 if nobody reads."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[ClusterEvent] = asyncio.Queue(1000)

    def put(self, event: ClusterEvent) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(event)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ClusterEvent:
        return await self._queue.get()


class _ClusterActor(Actor):
    def __init__(self, service: ClusterService) -> None:
        self.service = service

    async def receive(self, msg: Any, ctx: Any) -> None:
        if isinstance(msg, RaftWire):
            if self.service._bound(msg, msg.src, ctx.peer):
                self.service._on_raft(msg)
        elif isinstance(msg, Heartbeat):
            if self.service._bound(msg, msg.node_id, ctx.peer):
                self.service._on_heartbeat(msg)
        elif isinstance(msg, AdmitRequest):
            return self.service._on_admit(msg, ctx.peer)
        return None


class ClusterService:
    def __init__(
        self,
        system: ActorSystem,
        *,
        state_dir: Path | str | None = None,
        storage: Storage | None = None,
        facts: LocalFacts | None = None,
        static_peers: list[str] = (),  # type: ignore[assignment]
        mdns_interfaces: list[str] | None = None,
        secret: bytes = b"",
        tick: float = 0.05,
        heartbeat: float = 0.1,
        election: ElectionConfig = ElectionConfig(),
        detector: DetectorConfig = DetectorConfig(),
        bootstrap_after: float = 1.0,
        remove_dead_after: float | None = 1.0,
        forget_dead_after: float | None = FORGET_DEAD_AFTER_S,
        seed: int | None = None,
        clock: Clock = LOOP_CLOCK,
        admission: Admission | None = None,
    ) -> None:
        self.system = system
        self.clock = clock
        self.node_id = system.node_id
        self.forged: dict[str, int] = {}  # messages refused as not their sender's, by kind
        if storage is None:
            storage = FileStorage(state_dir) if state_dir is not None else MemoryStorage()
        if remove_dead_after is not None and not election.remove_dead_ticks:
            election = dataclasses.replace(election, remove_dead_ticks=max(1, math.ceil(remove_dead_after / tick)))
        if forget_dead_after is not None and not election.forget_dead_ticks:
            election = dataclasses.replace(election, forget_dead_ticks=max(1, math.ceil(forget_dead_after / tick)))
        self.election = Election(self.node_id, storage, random.Random(seed), election, admission=admission)
        self.facts = facts or LocalFacts()
        self.static_peers = [parse_peer(p) for p in static_peers]
        self.mdns_interfaces = mdns_interfaces
        self.secret = secret
        self.tick_s, self.heartbeat_s = tick, heartbeat
        self.detector = FailureDetector(detector)
        self.bootstrap = Bootstrap(self.node_id, bootstrap_after, campaign=self.election.cfg.campaign)
        self.fence = Fence(self.election.term, self.node_id, on_raise=self._on_fenced_term)
        self.hints = HintTable()
        self._info: dict[str, Heartbeat] = {}
        self._states: dict[str, str] = {}
        self._left: set[str] = set()
        self._leaving = False
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self._callbacks: list[Callable[[ClusterEvent], Any]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._mdns: MdnsDiscovery | None = None
        self._last_view: tuple[str | None, int] = (None, self.election.term)

    # ---- public API ------------------------------------------------------------------

    @property
    def coordinator(self) -> str | None:
        e = self.election
        return e.leader if e.role in (Role.FOLLOWER, Role.COORDINATOR) else None

    @property
    def term(self) -> int:
        return self.election.term

    @property
    def is_coordinator(self) -> bool:
        return self.election.is_coordinator

    def members(self) -> list[Member]:
        """Every node this one knows of, itself first."""
        now = self.clock.now()
        voters, members = set(self.election.voters), set(self.election.members)
        me = Member(
            self.node_id, self.facts.name, self.system.address, self.facts.backend, self.facts.device,
            self.facts.free_memory, "left" if self._leaving and self.node_id not in voters else "alive",
            self._roles(self.node_id, self.facts.roles), self.node_id in voters,
            self.facts.speed, self.facts.api_port, self.node_id in members,
            self.facts.host_id, self.facts.speed_source,
        )
        out = [me]
        for node_id in sorted((set(self._info) | members) - {self.node_id}):
            hb = self._info.get(node_id)
            out.append(Member(
                node_id,
                hb.name if hb else "",
                (hb.host, hb.port) if hb else self.system.peers().get(node_id),
                hb.backend if hb else "",
                hb.device if hb else "",
                hb.free_memory if hb else 0,
                self._state_of(node_id, now),
                self._roles(node_id, hb.roles if hb else []),
                node_id in voters,
                hb.speed if hb else 1.0,
                hb.api_port if hb else 0,
                node_id in members,
                _short(hb.host_id) if hb else "",
                _short(hb.speed_source, 300) if hb else "",
            ))
        return out

    def pending(self) -> tuple[str, ...]:
        """Keys that asked to join and wait for a member's approval (`--admit ask`), oldest first."""
        return self.election.pending()

    async def admit(self, prefix: str, timeout: float = 3.0) -> str:
        """Approve the pending key that starts with `prefix` (or a full node id): this node
        records the approval and tells the coordinator over the authenticated link, which
        admits it. Returns the node id; raises AdmissionError (or a failed ask) if not."""
        node_id = self.election.admission.resolve(prefix)
        self._dispatch(self.election.approve(node_id))
        coordinator = self.coordinator
        if coordinator is None:
            raise AdmissionError("there is no coordinator right now to admit the key; retry when the cluster "
                                 "has elected one (`mesh status`)")
        if coordinator != self.node_id:
            await self.system.ref(coordinator, ACTOR_NAME).ask(AdmitRequest(node_id), timeout=timeout)
        log.info("cluster.key_approved", node=self.node_id, key=node_id, coordinator=coordinator)
        return node_id

    def _on_admit(self, msg: AdmitRequest, peer: str | None) -> str:
        if peer is not None and peer not in self.election.members:
            log.warning("cluster.admit_refused", node=self.node_id, peer=peer, key=str(msg.node_id)[:32])
            raise AdmissionError(f"{peer} is not a member: only a member may approve a key")
        self._dispatch(self.election.approve(str(msg.node_id)))
        log.info("cluster.key_approved", node=self.node_id, key=msg.node_id, by=peer)
        return msg.node_id

    def _roles(self, node_id: str, roles: list[str]) -> tuple[str, ...]:
        extra = ["coordinator"] if node_id == self.coordinator else []
        return tuple(extra + [r for r in roles if r != "coordinator"])

    def events(self) -> EventStream:
        """Changes from now on: coordinator/term changes and member state changes.

        Unlike an async generator, the stream survives a cancelled `__anext__` (e.g. under
        `asyncio.wait_for(stream.__anext__(), 0.5)`); it is dropped when unreferenced.
        """
        stream = EventStream()
        self._streams.add(stream)
        return stream

    def on_change(self, callback: Callable[[ClusterEvent], Any]) -> None:
        self._callbacks.append(callback)

    async def start(self) -> None:
        self.system.spawn(_ClusterActor(self), name=ACTOR_NAME)
        self.system.on_peer(self._on_peer_event)
        for node_id in self.system.peers():
            self.election.add_peer(node_id)
        self._spawn(self._tick_loop())
        self._spawn(self._heartbeat_loop())
        for host, port in self.static_peers:
            self._spawn(self._dial_until_connected(host, port))
        if self.mdns_interfaces:
            assert self.system.address is not None, "start the actor system before the cluster service"
            self._mdns = MdnsDiscovery(
                self.node_id, self.system.address[1], self.secret, self.mdns_interfaces, self.add_hint,
            )
            await self._mdns.start()
        # The bootstrap wait counts from the moment discovery runs (mDNS start takes ~1 s).
        self.bootstrap.start(self.clock.now())
        log.info("cluster.started", node=self.node_id, term=self.term, voters=self.election.voters)

    async def stop(self) -> None:
        if self._mdns is not None:
            await self._mdns.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def leave(self, timeout: float = 3.0) -> bool:
        """Ask the coordinator to remove this node; True once the removal is committed."""
        self._leaving = True
        self._dispatch(self.election.leave())
        self._send_heartbeats()
        deadline = self.clock.now() + timeout
        while self.election.is_voter and self.clock.now() < deadline:
            await self.clock.sleep(self.tick_s)
        self._send_heartbeats()
        return not self.election.is_voter

    def add_hint(self, hint: PeerHint) -> None:
        """A discovered address (mDNS or static); dialed unless already connected, within
        the bounds of the hint table (`mesh.cluster.hints`)."""
        if hint.node_id not in self.system.peers():
            self.bootstrap.hint(hint.node_id, self.clock.now())
            self.hints.offer(hint)
            self._dial_hints()

    def _dial_hints(self) -> None:
        known = set(self.election.voters) | set(self._info)
        for hint in self.hints.due(self.clock.now(), set(self.system.peers()), known):
            self._spawn(self._dial_hint(hint))

    async def _dial_hint(self, hint: PeerHint) -> None:
        try:
            await self._connect_once(hint.host, hint.port)
        finally:
            self.hints.finished(hint)

    # ---- loops -----------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tick_loop(self) -> None:
        next_at = self.clock.now()
        while True:
            next_at += self.tick_s
            await self.clock.sleep(next_at - self.clock.now())
            self._maybe_bootstrap()
            self._dial_hints()  # the hints that waited for a dial slot
            self.election.set_dead(self._dead_members())
            self._dispatch(self.election.tick())
            self._update_member_states()

    async def _heartbeat_loop(self) -> None:
        while True:
            self._send_heartbeats()
            await self.clock.sleep(self.heartbeat_s)

    async def _dial_until_connected(self, host: str, port: int) -> None:
        delay = 0.1
        while True:
            if await self._connect_once(host, port):
                return
            await self.clock.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _connect_once(self, host: str, port: int) -> bool:
        try:
            node_id = await self.system.connect(host, port)
        except Exception as exc:
            log.debug("cluster.connect_failed", node=self.node_id, peer=f"{host}:{port}", error=repr(exc))
            return False
        self.election.add_peer(node_id)
        return True

    # ---- inputs ----------------------------------------------------------------------

    def _on_peer_event(self, event: PeerEvent) -> None:
        if event.up:
            self.election.add_peer(event.node_id)
            self.detector.link_up(event.node_id)
        else:
            self.detector.link_down(event.node_id, self.clock.now())

    def _bound(self, msg: Any, claimed: str, peer: str | None) -> bool:
        """Raft traffic's src and a Heartbeat's node id must be the link's authenticated
        peer: a member cannot speak for another (a forged LeaveRequest, a Heartbeat
        rewriting another node's address). Refusals are logged and counted."""
        if peer is None or claimed == peer:
            return True
        kind = type(msg).__name__ if not isinstance(msg, RaftWire) else msg.kind
        self.forged[kind] = self.forged.get(kind, 0) + 1
        log.warning("cluster.forged_message", node=self.node_id, peer=peer, kind=kind, claimed=claimed)
        return False

    def _on_raft(self, wire: RaftWire) -> None:
        msg = from_wire(wire)
        if msg is None:
            log.warning("cluster.bad_message", node=self.node_id, kind=wire.kind, src=wire.src)
            return
        try:
            check_message(msg, self.election.term, self.node_id)
        except ImplausibleMessage as exc:
            log.warning("cluster.implausible_message", node=self.node_id, kind=wire.kind, error=str(exc)[:200])
            return
        self._dispatch(self.election.step(msg))

    def _on_heartbeat(self, hb: Heartbeat) -> None:
        self.detector.heartbeat(hb.node_id, self.clock.now())
        self._info[hb.node_id] = hb
        self.election.add_peer(hb.node_id)
        if hb.leaving:
            self._left.add(hb.node_id)
        else:
            self._left.discard(hb.node_id)

    def _maybe_bootstrap(self) -> None:
        now = self.clock.now()
        heard = [Peer(n, self.detector.is_alive(n, now), hb.configured, NO_CAMPAIGN not in hb.roles)
                 for n, hb in self._info.items()]
        if self.bootstrap.decide(now, has_log=bool(self.election.log), heard=heard) is Decision.FOUND:
            log.info("cluster.founded", node=self.node_id)
            self.election.bootstrap((self.node_id,))

    def _on_fenced_term(self, term: int) -> None:
        self._dispatch(self.election.observe_term(term))

    def _dead_members(self) -> list[str]:
        """Voters dead for long lose their vote; members dead for very long are forgotten."""
        now = self.clock.now()
        members = self.election.members
        watched = {v: self.detector.is_alive(v, now) for v in members if v in self.detector.peers}
        return self.bootstrap.dead_members(now, members, watched)

    def _send_heartbeats(self) -> None:
        host, port = self.system.address or ("", 0)
        hb = Heartbeat(
            self.node_id, self.facts.name, host, port, self.facts.backend, self.facts.device,
            self.facts.free_memory, list(self.facts.roles), self.term, self.coordinator or "",
            bool(self.election.log), self._leaving, self.facts.speed, self.facts.api_port,
            self.facts.host_id, self.facts.speed_source,
        )
        for node_id in self.system.peers():
            self._tell(node_id, hb)

    # ---- outputs ---------------------------------------------------------------------

    def _tell(self, node_id: str, msg: Any) -> None:
        try:
            self.system.ref(node_id, ACTOR_NAME).tell(msg)
        except Exception as exc:  # a full or closed link: the protocols retry on their own
            log.debug("cluster.send_dropped", node=self.node_id, to=node_id, error=repr(exc))

    def _dispatch(self, out: Outbox) -> None:
        for to, msg in out:
            self._tell(to, to_wire(msg))
        self.fence.observe(self.election.term)
        view = (self.coordinator, self.term)
        if view != self._last_view:
            self._last_view = view
            self._emit(ClusterEvent("coordinator", view[0], view[1]))

    def _state_of(self, node_id: str, now: float) -> str:
        if node_id in self._left and node_id not in self.election.voters:
            return "left"
        return self.detector.state(node_id, now).value

    def _update_member_states(self) -> None:
        now = self.clock.now()
        for node_id in (set(self._info) | set(self.election.voters)) - {self.node_id}:
            state = self._state_of(node_id, now)
            before = self._states.get(node_id)
            if before != state:
                self._states[node_id] = state
                if before is not None or state != Liveness.ALIVE.value:
                    self._emit(ClusterEvent("member", node_id, self.term, state))

    def _emit(self, event: ClusterEvent) -> None:
        log.info("cluster.event", node=self.node_id, kind=event.kind, about=event.node_id,
                 term=event.term, state=event.state or None)
        for cb in list(self._callbacks):
            try:
                result = cb(event)
                if asyncio.iscoroutine(result):
                    self._spawn(result)
            except Exception as exc:
                log.warning("cluster.callback_failed", error=repr(exc))
        for stream in list(self._streams):
            stream.put(event)


__all__ = ["ClusterEvent", "ClusterService", "LocalFacts", "Member"]
