"""The addresses discovery reported, and which of them to dial now. Sans-IO.

mDNS records are not authenticated: anyone on the LAN can announce any number of them,
each naming an address of its choice. A hint is only a hint (the handshake decides who is
a peer), but dialing costs a connection attempt and a task, so a flood of hints must cost
bounded memory and a bounded rate of dials, while a real peer's hint is still dialed soon:

- at most `max_addresses` addresses are kept (the least recently offered go first);
- one address is dialed at most once per `per_address_s`, and only again when discovery
  offers it again (a record re-announced or updated);
- at most `max_in_flight` dials run at once;
- dials start at most `rate` per second on average, `burst` at once (a token bucket).
A hint that has to wait stays pending and is handed out by a later `due()` (the cluster
service calls it on every tick), so a limit delays a real peer and never loses it. Within
the limits, `due` hands out the hints of known nodes first (the voters, the nodes we have
heard from), then the most recently offered: a flood of junk hints that came first does
not queue ahead of a real peer's fresh announcement.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Set
from dataclasses import dataclass, field

from mesh.cluster.discovery import PeerHint

Address = tuple[str, int]


@dataclass
class _Entry:
    hint: PeerHint
    wanted: bool = True  # offered since its last dial
    last_dial: float = float("-inf")
    in_flight: bool = False


@dataclass
class HintStats:
    offered: int = 0
    evicted: int = 0
    dials: int = 0


@dataclass
class HintTable:
    max_addresses: int = 256
    per_address_s: float = 5.0
    max_in_flight: int = 8
    rate: float = 4.0
    burst: int = 8
    stats: HintStats = field(default_factory=HintStats)

    def __post_init__(self) -> None:
        self._entries: OrderedDict[Address, _Entry] = OrderedDict()
        self._tokens = float(self.burst)
        self._refilled_at: float | None = None
        self.in_flight = 0

    def __len__(self) -> int:
        return len(self._entries)

    def offer(self, hint: PeerHint) -> None:
        """Discovery reported `hint`: remember it, to be dialed when `due` allows."""
        self.stats.offered += 1
        address = (hint.host, hint.port)
        entry = self._entries.get(address)
        if entry is None:
            entry = self._entries[address] = _Entry(hint)
        else:
            entry.hint, entry.wanted = hint, True
        self._entries.move_to_end(address)
        while len(self._entries) > self.max_addresses:
            # The least recently offered that is not being dialed (`finished` needs those).
            victim = next((a for a, e in self._entries.items() if not e.in_flight), None)
            if victim is None:
                break
            del self._entries[victim]
            self.stats.evicted += 1

    def due(self, now: float, connected: Set[str] = frozenset(), known: Set[str] = frozenset()) -> list[PeerHint]:
        """The hints to dial now (each marked in flight until `finished`); within every bound.

        `connected`: node ids we have a link to already; their hints are dropped from the wish
        list. `known`: node ids to dial before any other (members, nodes we heard from).
        """
        self._refill(now)
        out: list[PeerHint] = []
        newest_first = list(reversed(self._entries.values()))
        ordered = [e for e in newest_first if e.hint.node_id in known]
        ordered += [e for e in newest_first if e.hint.node_id not in known]
        for entry in ordered:
            if self.in_flight >= self.max_in_flight or self._tokens < 1:
                break
            if not entry.wanted or entry.in_flight:
                continue
            if entry.hint.node_id in connected:
                entry.wanted = False
                continue
            if now - entry.last_dial < self.per_address_s:
                continue
            entry.wanted, entry.in_flight, entry.last_dial = False, True, now
            self.in_flight += 1
            self._tokens -= 1
            self.stats.dials += 1
            out.append(entry.hint)
        return out

    def finished(self, hint: PeerHint) -> None:
        """The dial of `hint` (from `due`) ended, whatever its outcome."""
        entry = self._entries.get((hint.host, hint.port))
        if entry is not None and entry.in_flight:
            entry.in_flight = False
            self.in_flight -= 1

    def _refill(self, now: float) -> None:
        if self._refilled_at is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._refilled_at) * self.rate)
        self._refilled_at = now
