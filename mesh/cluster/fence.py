"""Term fencing: reject commands from a coordinator whose term is older than one we have seen.

Every command a coordinator sends carries its term. A receiver keeps the highest term
it has seen (from the election and from commands) and refuses anything lower, so an
old coordinator that has not yet noticed it was replaced cannot change anything.
The pipeline layer keeps one `Fence` per node and calls `check` on every command.

Durability: `ClusterService.fence` starts at the election's persisted term and hands every
higher term it accepts to the election (`on_raise` -> `Election.observe_term`), which saves
it before the command is applied. So a restarted node still refuses the terms it had
fenced off; a bare `Fence()` keeps its highest term in memory only.

A term out of range (`bounds.check_term`: above 2**53, or more than 2**16 above the highest
seen) is refused like a stale one: adopting it would persist a term no election can follow.
"""

from __future__ import annotations

import structlog

from collections.abc import Callable

from mesh.cluster.bounds import ImplausibleMessage, check_term


log = structlog.get_logger("mesh.cluster.fence")


class Fence:
    def __init__(self, highest: int = 0, node: str = "", on_raise: Callable[[int], None] | None = None) -> None:
        self.highest = highest
        self.node = node
        self.rejected = 0
        self.on_raise = on_raise  # called with a newly accepted higher term, before check() returns

    def observe(self, term: int) -> None:
        """Raise the highest term seen (e.g. when the election moves to a new term)."""
        if term > self.highest:
            self.highest = term

    def check(self, term: int, *, src: str = "", command: str = "") -> bool:
        """True if a command of `term` may be applied; False (and a log line) if it is stale or implausible."""
        try:
            check_term(term, self.highest)
        except ImplausibleMessage as exc:
            self.rejected += 1
            log.warning("fence.implausible_term", node=self.node, src=src, command=command, seen=self.highest,
                        error=str(exc)[:200])
            return False
        if term < self.highest:
            self.rejected += 1
            log.warning(
                "fence.stale_term", node=self.node, src=src, command=command, term=term, seen=self.highest
            )
            return False
        if term > self.highest:
            self.highest = term
            if self.on_raise is not None:
                self.on_raise(term)
        return True
