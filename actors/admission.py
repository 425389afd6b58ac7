"""Admission of inbound connections before authentication: what a stranger can cost us.

A responder handshake holds a little state until it completes or times out. Without a cap,
a stranger who opens connections and never finishes them holds that state without bound.
`HandshakeGate` caps the pending responder handshakes of a node (`max_pending`) and those
from one remote host (`max_pending_per_host`, a quarter of it by default), so one flooding
address cannot take every slot from the peers that dial in at the same time. A connection
over either cap is closed at once, before its first byte is read.

Refused hellos (`HelloRefused`: no secret, stale, replayed) are logged at most once per
`log_interval` per reason, with the count of the ones left out: a flood of them must not
turn into a flood of log lines on the event loop.
"""

from __future__ import annotations

from typing import Any

from .clock import LOOP_CLOCK, Clock
from .errors import HelloRefused


class HandshakeGate:
    def __init__(self, max_pending: int = 64, max_pending_per_host: int | None = None, *,
                 clock: Clock = LOOP_CLOCK, log_interval: float = 1.0) -> None:
        if max_pending < 1:
            raise ValueError("max_pending_handshakes must be at least 1")
        self.max_pending = max_pending
        self.max_pending_per_host = max_pending_per_host or max(1, max_pending // 4)
        self.clock = clock
        self.log_interval = log_interval
        self.pending = 0
        self.refused_busy = 0
        self.refused: dict[str, int] = {}  # refused hellos by reason
        self._per_host: dict[str, int] = {}
        self._last_logged: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def try_enter(self, host: str) -> bool:
        """Take a slot for a responder handshake from `host`; False: close the connection."""
        if self.pending >= self.max_pending or self._per_host.get(host, 0) >= self.max_pending_per_host:
            self.refused_busy += 1
            return False
        self.pending += 1
        self._per_host[host] = self._per_host.get(host, 0) + 1
        return True

    def leave(self, host: str) -> None:
        self.pending -= 1
        left = self._per_host.get(host, 0) - 1
        if left > 0:
            self._per_host[host] = left
        else:
            self._per_host.pop(host, None)

    def should_log(self, reason: str) -> int | None:
        """None to stay silent; else how many like it were left out since the last line."""
        now = self.clock.now()
        last = self._last_logged.get(reason)
        if last is not None and now - last < self.log_interval:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return None
        self._last_logged[reason] = now
        return self._suppressed.pop(reason, 0)

    def log_refused(self, log: Any, exc: HelloRefused, where: str) -> None:
        """One rate-limited line for a refused hello (`link.secret_mismatch` or `link.hello_refused`)."""
        self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
        suppressed = self.should_log(exc.reason)
        if suppressed is None:
            return
        if exc.reason == "secret":
            log.error("link.secret_mismatch", peer="?", address=where, suppressed=suppressed,
                      detail=f"a peer at {where} does not know our cluster secret; check --secret-file on both "
                             "machines")
        else:
            log.warning("link.hello_refused", address=where, reason=exc.reason, suppressed=suppressed,
                        error=str(exc))
