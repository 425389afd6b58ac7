"""Phi-accrual failure detection over heartbeats (Hayashibara et al.), sans-IO.

Feed arrival times with `heartbeat(node, now)`; ask `phi(node, now)` or
`state(node, now)` at any time. Time is whatever monotonic seconds the caller uses,
so tests drive it with a virtual clock.

Tuned for a LAN with heartbeats every 100 ms: the expected gap is learned from the
recent arrivals, and its spread is never taken below `min_std` (the event loop of a
busy Python process jitters by tens of milliseconds). With the defaults a node whose
heartbeats stop is `suspect` after about 0.5 s and `dead` after about 1 s. A node
that is busy computing is not: model compute runs off the event loop, so its
heartbeats keep flowing.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum


class Liveness(str, Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    expected_interval: float = 0.1
    window: int = 100
    min_std: float = 0.15
    acceptable_pause: float = 0.0
    suspect_phi: float = 3.0
    dead_phi: float = 8.0
    # A closed connection that stays closed this long, with no heartbeat since, is a
    # dead node: a crashed process's sockets are reset by its kernel at once. A cut
    # cable or a frozen machine sends nothing, and heartbeats decide as before.
    link_grace: float = 0.3


class PhiAccrual:
    """One peer's heartbeat history and its suspicion level."""

    def __init__(self, config: DetectorConfig = DetectorConfig()) -> None:
        self.cfg = config
        self.intervals: deque[float] = deque(maxlen=config.window)
        # running sums over ``intervals``: phi is asked for every peer on every tick
        self._sum = 0.0
        self._sumsq = 0.0
        self.last: float | None = None
        self.link_lost: float | None = None

    def heartbeat(self, now: float) -> None:
        self.link_lost = None
        if self.last is not None:
            gap = now - self.last
            if gap < 0:
                return  # a reordered timestamp carries no information
            self._append(gap)
        else:
            # Seed the history with the expected interval so that the first seconds
            # after a peer appears already detect its failure.
            self._append(self.cfg.expected_interval)
        self.last = now

    def _append(self, gap: float) -> None:
        if len(self.intervals) == self.intervals.maxlen:
            old = self.intervals[0]
            self._sum -= old
            self._sumsq -= old * old
        self.intervals.append(gap)
        self._sum += gap
        self._sumsq += gap * gap

    def phi(self, now: float) -> float:
        if self.last is None:
            return 0.0
        n = len(self.intervals)
        mean = self._sum / n
        var = max(0.0, self._sumsq / n - mean * mean)  # rounding can take it just below 0
        std = max(math.sqrt(var), self.cfg.min_std)
        elapsed = max(0.0, now - self.last)
        z = (elapsed - mean - self.cfg.acceptable_pause) / std
        # P(gap > elapsed) under a normal model; erfc keeps precision in the far tail.
        p_later = 0.5 * math.erfc(z / math.sqrt(2))
        return -math.log10(p_later) if p_later > 0 else math.inf

    def state(self, now: float) -> Liveness:
        if self.link_lost is not None and now - self.link_lost >= self.cfg.link_grace:
            return Liveness.DEAD
        phi = self.phi(now)
        if phi >= self.cfg.dead_phi:
            return Liveness.DEAD
        if phi >= self.cfg.suspect_phi:
            return Liveness.SUSPECT
        return Liveness.ALIVE


class FailureDetector:
    """Phi-accrual detectors for every peer, keyed by node id."""

    def __init__(self, config: DetectorConfig = DetectorConfig()) -> None:
        self.cfg = config
        self.peers: dict[str, PhiAccrual] = {}

    def heartbeat(self, node: str, now: float) -> None:
        self.peers.setdefault(node, PhiAccrual(self.cfg)).heartbeat(now)

    def link_down(self, node: str, now: float) -> None:
        """The transport lost its connection to ``node`` (it redials on its own)."""
        peer = self.peers.get(node)
        if peer is not None and peer.link_lost is None:
            peer.link_lost = now

    def link_up(self, node: str) -> None:
        peer = self.peers.get(node)
        if peer is not None:
            peer.link_lost = None

    def forget(self, node: str) -> None:
        self.peers.pop(node, None)

    def phi(self, node: str, now: float) -> float:
        peer = self.peers.get(node)
        return peer.phi(now) if peer else math.inf

    def state(self, node: str, now: float) -> Liveness:
        peer = self.peers.get(node)
        return peer.state(now) if peer else Liveness.DEAD

    def is_alive(self, node: str, now: float) -> bool:
        return self.state(node, now) is not Liveness.DEAD

    def time_to_dead(self, node: str) -> float:
        """Seconds of silence after which `node` becomes dead, given its history so far."""
        peer = self.peers[node]
        lo, hi = 0.0, 60.0
        assert peer.last is not None
        for _ in range(50):
            mid = (lo + hi) / 2
            if peer.phi(peer.last + mid) >= self.cfg.dead_phi:
                hi = mid
            else:
                lo = mid
        return hi
