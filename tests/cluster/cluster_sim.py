"""A deterministic simulator for the election machine: in-memory network, virtual clock, faults.

Everything random comes from one `random.Random(seed)`, so a seed replays a run exactly.
After every delivery and tick the invariants are checked:
- never two coordinators in the same term (over the whole history);
- committed log prefixes never disagree (configurations only change through commits);
- no node accepts a command from a term lower than one it has seen (fencing), even
  across a restart (an accepted command's term is handed to the election, which saves it).
- only a coordinator names itself as the coordinator (a follower that followed itself
  would never campaign: with it as the last voter, the cluster never elected again).

With `config.remove_dead_ticks` set, every node also heartbeats every peer each tick and
runs a toy failure detector (dead after `DETECT_TICKS` of silence) that feeds
`Election.set_dead`, as `ClusterService` does with the phi-accrual detector.
`converge()` heals every fault and asserts one coordinator within a bounded number of ticks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import heapq
import random
from dataclasses import dataclass, field

import structlog

from mesh.cluster.election import Election, ElectionConfig, Role
from mesh.cluster.fence import Fence
from mesh.cluster.messages import Entry, Message
from mesh.cluster.persistence import MemoryStorage

DETECT_TICKS = 5



@contextlib.contextmanager
def silenced_logs() -> Iterator[None]:
    """The simulator drives thousands of elections: keep their log lines out, then
    restore whatever logging the process had (other tests capture logs)."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))
    try:
        yield
    finally:
        structlog.configure(**saved)


@dataclass(frozen=True)
class Command:
    """What a coordinator's application messages look like to the fence: a term and a sender."""

    term: int
    src: str


@dataclass(frozen=True)
class Beat:
    """A heartbeat: only feeds the receiver's toy failure detector."""

    src: str


@dataclass
class SimNode:
    id: str
    storage: MemoryStorage
    election: Election
    fence: Fence
    up: bool = True
    seen: int = 0  # highest term this node has seen (election term or accepted command)
    born: int = 0
    heard: dict[str, int] = field(default_factory=dict)

    def dead_peers(self, now: int, ids: list[str]) -> set[str]:
        return {p for p in ids if p != self.id and now - self.heard.get(p, self.born) > DETECT_TICKS}


class InvariantViolation(AssertionError):
    pass


@dataclass
class Sim:
    seed: int
    config: ElectionConfig = field(default_factory=ElectionConfig)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.nodes: dict[str, SimNode] = {}
        self.now = 0
        self.queue: list[tuple[int, int, str, object]] = []
        self._seq = 0
        self.cut: set[frozenset[str]] = set()
        self.loss = 0.0
        self.max_delay = 0
        self.coordinators: dict[int, str] = {}
        self.committed: list[Entry] = []
        self.commands_accepted = 0
        self.commands_fenced = 0

    # ---- topology ------------------------------------------------------------------

    def _new_node(self, node_id: str, storage: MemoryStorage) -> SimNode:
        election = Election(
            node_id, storage, random.Random(self.rng.getrandbits(32)), self.config, tuple(self.nodes)
        )
        node = SimNode(node_id, storage, election, Fence(election.term, node_id), seen=election.term, born=self.now)
        node.fence.on_raise = lambda term: self._send(node_id, election.observe_term(term))
        return node

    def bootstrap(self, n: int) -> None:
        ids = tuple(f"n{i}" for i in range(n))
        for node_id in ids:
            self.nodes[node_id] = self._new_node(node_id, MemoryStorage())
        for node in self.nodes.values():
            node.election.peers |= set(ids) - {node.id}
            node.election.bootstrap(ids)

    def add_node(self) -> str:
        node_id = f"n{len(self.nodes)}"
        node = self._new_node(node_id, MemoryStorage())
        self.nodes[node_id] = node
        for other in self.nodes.values():
            other.election.add_peer(node_id)
        return node_id

    def crash(self, node_id: str) -> None:
        self.nodes[node_id].up = False

    def restart(self, node_id: str) -> None:
        old = self.nodes[node_id]
        node = self._new_node(node_id, old.storage)
        node.election.peers |= set(self.nodes) - {node_id}
        node.seen = max(node.seen, old.seen)  # fencing must hold across the restart too
        self.nodes[node_id] = node

    def partition(self, groups: list[set[str]]) -> None:
        """Cut every link between different groups."""
        self.cut = set()
        for i, a in enumerate(groups):
            for b in groups[i + 1 :]:
                self.cut |= {frozenset((x, y)) for x in a for y in b}

    def cut_links(self, links: set[frozenset[str]]) -> None:
        self.cut = set(links)

    def heal(self) -> None:
        self.cut = set()
        self.loss = 0.0
        self.max_delay = 0

    # ---- running -------------------------------------------------------------------

    def _send(self, src: str, out: list[tuple[str, Message]] | list[tuple[str, object]]) -> None:
        for dst, msg in out:
            if dst not in self.nodes or frozenset((src, dst)) in self.cut:
                continue
            if self.loss and self.rng.random() < self.loss:
                continue
            delay = self.rng.randint(0, self.max_delay) if self.max_delay else 0
            self._seq += 1
            heapq.heappush(self.queue, (self.now + delay, self._seq, dst, (src, msg)))

    def _deliver_due(self) -> None:
        while self.queue and self.queue[0][0] <= self.now:
            _, _, dst, (src, msg) = heapq.heappop(self.queue)
            node = self.nodes[dst]
            if not node.up or frozenset((src, dst)) in self.cut:
                continue
            node.heard[src] = self.now
            if isinstance(msg, Beat):
                continue
            if isinstance(msg, Command):
                self._on_command(node, msg)
            else:
                self._send(dst, node.election.step(msg))
            self._check(node)

    def _on_command(self, node: SimNode, cmd: Command) -> None:
        node.fence.observe(node.election.term)
        if node.fence.check(cmd.term, src=cmd.src, command="sim"):
            if cmd.term < node.seen:
                raise InvariantViolation(
                    f"seed={self.seed}: {node.id} accepted a command of term {cmd.term} after seeing {node.seen}"
                )
            node.seen = cmd.term
            self.commands_accepted += 1
        else:
            self.commands_fenced += 1

    def tick(self) -> None:
        self.now += 1
        detect = bool(self.config.remove_dead_ticks)
        ids = sorted(self.nodes)
        for node in list(self.nodes.values()):
            if not node.up:
                continue
            if detect:
                node.election.set_dead(node.dead_peers(self.now, ids))
                self._send(node.id, [(peer, Beat(node.id)) for peer in ids if peer != node.id])
            self._send(node.id, node.election.tick())
            if node.election.is_coordinator:
                cmd = Command(node.election.term, node.id)
                self._send(node.id, [(peer, cmd) for peer in sorted(node.election.peers)])
            self._check(node)
        self._deliver_due()

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick()

    # ---- invariants ----------------------------------------------------------------

    def _check(self, node: SimNode) -> None:
        e = node.election
        node.seen = max(node.seen, e.term)
        if e.is_coordinator:
            holder = self.coordinators.setdefault(e.term, node.id)
            if holder != node.id:
                raise InvariantViolation(
                    f"seed={self.seed}: two coordinators in term {e.term}: {holder} and {node.id}"
                )
        if e.leader == node.id and not e.is_coordinator:
            raise InvariantViolation(f"seed={self.seed}: {node.id} is a {e.role.value} that follows itself")
        prefix = e.log[: e.commit]
        common = min(len(prefix), len(self.committed))
        if prefix[:common] != self.committed[:common]:
            raise InvariantViolation(f"seed={self.seed}: {node.id} committed a log that disagrees")
        if len(prefix) > len(self.committed):
            self.committed = list(prefix)

    # ---- liveness ------------------------------------------------------------------

    def settled(self) -> str | None:
        """The coordinator if every live node agrees on it and membership requests are done."""
        leaders = [n for n in self.nodes.values() if n.up and n.election.is_coordinator]
        if len(leaders) != 1:
            return None
        leader = leaders[0].election
        for node in self.nodes.values():
            e = node.election
            if not node.up:
                continue
            if not e.membership_settled:
                return None
            if e.is_member and (e.term != leader.term or e.leader != leader.id or e.voters != leader.voters
                                or e.members != leader.members):
                return None  # a learner too follows the coordinator (a lagging one is vouched for)
            if e.is_voter and e.role not in (Role.FOLLOWER, Role.COORDINATOR):
                return None
        return leader.id

    def converge(self, bound: int) -> int:
        """Heal everything, restart crashed nodes; return ticks until settled (fail past `bound`)."""
        self.heal()
        for node_id, node in self.nodes.items():
            if not node.up:
                self.restart(node_id)
        for ticks in range(1, bound + 1):
            self.tick()
            if self.settled() is not None:
                return ticks
        states = {n.id: (n.election.role.value, n.election.term, n.election.leader, n.election.voters)
                  for n in self.nodes.values()}
        raise InvariantViolation(f"seed={self.seed}: no single coordinator after {bound} ticks: {states}")
