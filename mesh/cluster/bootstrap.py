"""Whether a new node founds a home cluster, as a pure decision: time is a number passed in.

A node with no persisted state (no log) waits ``wait_s`` from the moment its discovery
runs, so that the peers it can reach have time to say who they are. Then:

1. if an alive peer is already part of a cluster (its heartbeat says it has a log), it
   founds nothing: the election keeps asking that cluster to add it;
2. if a node that discovery hinted at has not been heard from yet, and the hint is
   younger than ``wait_s``, it waits: that node may be a cluster already;
3. a node that never campaigns never founds either: it waits to be added;
4. otherwise it founds a cluster of itself alone if its id is the lowest among the alive
   new nodes that campaign; the others then join it one at a time.

`Bootstrap` also says when the links have had time to form (``settled``): a voter never
heard from since start counts as dead only then (``dead_members``).

`ClusterService` (mesh/cluster/service.py) feeds it what its failure detector and the
peers' heartbeats say, and carries out a `Decision.FOUND`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

# After the bootstrap wait, how much longer links may take to form before a voter never
# heard from counts as dead.
SETTLE_S = 1.0


class Decision(Enum):
    MEMBER = "member"  # it has a log: it is, or was, in a cluster; nothing to found
    WAIT = "wait"  # discovery has not run for the bootstrap wait yet
    JOIN = "join"  # an alive peer is in a cluster: the election asks it to add this node
    AWAIT_HINTED = "await-hinted"  # a discovered node not heard from yet may be a cluster
    NEVER = "never"  # this node does not campaign, so it does not found: it waits to be added
    DEFER = "defer"  # a new node with a lower id founds; this one joins it then
    FOUND = "found"  # found a cluster of this node alone


@dataclass(frozen=True)
class Peer:
    """A peer this node has heard a heartbeat from, as the bootstrap sees it."""

    node_id: str
    alive: bool  # the failure detector's view now
    configured: bool  # its heartbeat says it has a log: it is part of a cluster
    campaigns: bool  # it may lead (and found); false for a "no-campaign" node


class Bootstrap:
    def __init__(self, node_id: str, wait_s: float, *, campaign: bool = True, settle_s: float = SETTLE_S) -> None:
        self.node_id = node_id
        self.wait_s = wait_s
        self.campaign = campaign
        self.settle_s = settle_s
        self.started_at = math.inf  # set once discovery runs; nothing is decided before that
        self.hinted: dict[str, float] = {}  # node discovery told of -> when it first did

    def start(self, now: float) -> None:
        """Discovery runs from ``now``: the wait counts from here."""
        self.started_at = now

    def hint(self, node_id: str, now: float) -> None:
        """Discovery told of ``node_id`` (not connected yet) at ``now``."""
        self.hinted.setdefault(node_id, now)

    def decide(self, now: float, *, has_log: bool, heard: Iterable[Peer]) -> Decision:
        """What to do at ``now``. ``has_log``: this node has a persisted log; ``heard``:
        every peer whose heartbeat it has."""
        if has_log:
            return Decision.MEMBER
        if now - self.started_at < self.wait_s:
            return Decision.WAIT
        heard = list(heard)
        alive = [p for p in heard if p.alive]
        if any(p.configured for p in alive):
            return Decision.JOIN
        known = {p.node_id for p in heard}
        if any(n not in known and now - at < self.wait_s for n, at in self.hinted.items()):
            return Decision.AWAIT_HINTED
        if not self.campaign:
            return Decision.NEVER
        if all(self.node_id < p.node_id for p in alive if p.campaigns):
            return Decision.FOUND
        return Decision.DEFER

    def settled(self, now: float) -> bool:
        """Whether the links have had time to form since discovery started."""
        return now - self.started_at > self.wait_s + self.settle_s

    def dead_members(self, now: float, members: Iterable[str], alive: Mapping[str, bool]) -> list[str]:
        """The members other than this node to report dead. ``alive``: the failure
        detector's verdict on each member it watches; one it does not watch (never heard
        from since start) is dead once the links settled."""
        settled = self.settled(now)
        return [v for v in members if v != self.node_id and (not alive[v] if v in alive else settled)]
