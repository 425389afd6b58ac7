"""When the auditor runs its passes, as pure decisions: time is a number passed in.

`AuditSchedule` is told of each audit request (``request``) and of each timer it asked
for (``wake``), with ``now`` and how long this node's own stage has been idle, and
answers with an action: `CheckAt` (wake me for this track at that time) or `StartPass`
(run the track's gathered requests now). It also keeps the audited nodes' probation and
says which turn a pass takes on the audit process (``turn``); `Turns` decides which
waiting pass gets the audit process next. No asyncio and no clock in here: the
`Auditor` (mesh/verify/auditor.py) carries the actions out with its injected clock.

The rules, and why (docs/verification.md, "Audits" and "Speed"):

- An escalation (round > 1) is checked at once: a second auditor's verdict flags a node.
- While the audited node is on probation for the stage (fewer than
  ``PROBATION_SESSIONS`` of its sessions in this plan had a clean first pass, or again
  after a failure), a session's first pass gathers for ``FIRST_GATHER_S`` (or the gather
  time, if shorter) and runs whether or not this node's stage decodes: a cheat shows from
  a session's first steps, so catch it early.
- Every other pass gathers for ``gather_s`` and then waits while this node's stage
  computed within ``IDLE_S`` (a pass next to a decoding stage slows it: decode is bound
  by memory bandwidth and the pass reads the same layers' weights again), re-checking
  every ``RECHECK_S``, but never past ``defer_s`` after its first request: that bounds
  how late a cheat that starts mid-answer is caught.
- One pass at a time on the audit process: escalations first, then a session's first
  pass (from its first step) while its node is on probation, then the rest in order of
  arrival.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import NamedTuple

# How long requests gather before a later pass (each pass reads the stage's weights once).
GATHER_S = 1.0  # VerifyConfig.gather_s
FIRST_GATHER_S = 0.25  # a session's first pass on a stage while on probation: catch a cheat early
# A node is on probation for a stage (in one plan) until its first passes of this many
# sessions came back clean; a failure puts it back on probation.
PROBATION_SESSIONS = 2
# A later pass waits while this node's stage computed within IDLE_S, at most DEFER_S after
# its first request.
DEFER_S = 20.0  # VerifyConfig.defer_s
IDLE_S = 0.5
RECHECK_S = 0.25  # how often a held pass looks again whether the stage went idle
MAX_PRODUCERS = 256  # probation records kept (the oldest go first)


class TrackKey(NamedTuple):
    """One audited (plan, session, stage, node) in one audit round: the unit a pass runs."""

    term: int
    version: int
    session: str
    stage: int
    node: str
    round: int

    @property
    def producer(self) -> tuple[int, int, int, str]:
        """(term, version, stage, node): whose record probation keeps."""
        return self.term, self.version, self.stage, self.node


@dataclass(frozen=True)
class CheckAt:
    """Call `AuditSchedule.wake` for ``key`` at time ``at``."""

    key: TrackKey
    at: float


@dataclass(frozen=True)
class StartPass:
    """Run the requests gathered for ``key`` now, in one pass."""

    key: TrackKey


Action = CheckAt | StartPass


class Turn(IntEnum):
    """A pass's place in the queue for the audit process (lower goes first)."""

    ESCALATION = 0
    PROBATION_FIRST_PASS = 1
    LATER = 2


class Outcome(Enum):
    """What a pass found, as probation counts it."""

    CLEAN = "clean"  # every audited step passed
    FAILED = "failed"  # at least one step failed (not merely inconclusive)
    INCONCLUSIVE = "inconclusive"  # no failure, but not every step was judged


@dataclass
class _Gathering:
    deadline: float | None  # None: run when the gather time is up, whatever the stage does


class AuditSchedule:
    """The auditor's scheduling decisions (see the module docstring)."""

    def __init__(self, *, gather_s: float = GATHER_S, defer_s: float = DEFER_S,
                 first_gather_s: float = FIRST_GATHER_S, idle_s: float = IDLE_S, recheck_s: float = RECHECK_S,
                 probation_sessions: int = PROBATION_SESSIONS, max_producers: int = MAX_PRODUCERS) -> None:
        self.gather_s = gather_s
        self.defer_s = defer_s
        self.first_gather_s = first_gather_s
        self.idle_s = idle_s
        self.recheck_s = recheck_s
        self.probation_sessions = probation_sessions
        self.max_producers = max_producers
        self.gathering: dict[TrackKey, _Gathering] = {}  # tracks whose pass is not started yet
        self.cleared: dict[tuple, int] = {}  # producer -> sessions whose first pass was clean

    # -- inputs ------------------------------------------------------------------------

    def request(self, key: TrackKey, now: float, *, track_open: bool) -> CheckAt | None:
        """An audit request for ``key`` arrived at ``now``. ``track_open``: a pass of this
        track already ran (the auditor holds its cache), so this is not the session's first.
        Returns when to look at the track, or None if it is already gathering (the request
        joins that pass)."""
        if key in self.gathering:
            return None
        if key.round > 1:  # an escalation: at once
            self.gathering[key] = _Gathering(None)
            return CheckAt(key, now)
        if not track_open and self.on_probation(key):  # a first pass on probation: soon, regardless
            self.gathering[key] = _Gathering(None)
            return CheckAt(key, now + min(self.gather_s, self.first_gather_s))
        self.gathering[key] = _Gathering(now + self.defer_s)
        return CheckAt(key, now + self.gather_s)

    def wake(self, key: TrackKey, now: float, stage_idle_s: float) -> Action | None:
        """The time asked for by a `CheckAt` for ``key`` came. ``stage_idle_s``: seconds
        since this node's own stage last computed. Start the pass, or hold it while the
        stage decodes and its deadline is ahead (None: nothing gathers for ``key``)."""
        gathering = self.gathering.get(key)
        if gathering is None:
            return None
        deadline = gathering.deadline
        if deadline is not None and now < deadline - 1e-9 and stage_idle_s < self.idle_s:
            return CheckAt(key, now + min(self.recheck_s, deadline - now))
        del self.gathering[key]
        return StartPass(key)

    def judged(self, key: TrackKey, *, opened_session: bool, outcome: Outcome) -> None:
        """A pass of ``key`` came back. A session's clean first pass (``opened_session``,
        round 1) counts towards its node's probation; any failure restarts it."""
        producer = key.producer
        if outcome is Outcome.FAILED:
            self.cleared[producer] = 0
        elif outcome is Outcome.CLEAN and opened_session and key.round == 1:
            self.cleared[producer] = self.cleared.get(producer, 0) + 1
        while len(self.cleared) > self.max_producers:
            self.cleared.pop(next(iter(self.cleared)))

    # -- questions ---------------------------------------------------------------------

    def on_probation(self, key: TrackKey) -> bool:
        """Whether ``key``'s node is still on probation for its stage and plan."""
        return self.cleared.get(key.producer, 0) < self.probation_sessions

    def turn(self, key: TrackKey, *, from_start: bool) -> Turn:
        """The pass's place in the queue for the audit process. ``from_start``: the pass
        re-runs the session from its first step (its first pass, or after a failure)."""
        if key.round > 1:
            return Turn.ESCALATION
        if from_start and self.on_probation(key):
            return Turn.PROBATION_FIRST_PASS
        return Turn.LATER


class Turns:
    """Who runs on the audit process next: one holder at a time, then the waiter of the
    lowest `Turn`, in order of arrival among equals. Tickets are any hashable values
    but None."""

    def __init__(self) -> None:
        self.holder: Hashable | None = None
        self._queue: list[tuple[int, int, Hashable]] = []
        self._seq = 0
        self._withdrawn: set[Hashable] = set()

    def ask(self, ticket: Hashable, turn: Turn) -> bool:
        """``ticket`` wants the audit process: True if it has it now, else it waits."""
        if self.holder is None:
            self.holder = ticket
            return True
        self._seq += 1
        heapq.heappush(self._queue, (int(turn), self._seq, ticket))
        return False

    def release(self) -> Hashable | None:
        """The holder is done: returns the ticket that holds the audit process now (None:
        nobody waits, and it is free)."""
        self.holder = None
        while self._queue:
            ticket = heapq.heappop(self._queue)[2]
            if ticket in self._withdrawn:
                self._withdrawn.discard(ticket)
                continue
            self.holder = ticket
            return ticket
        return None

    def withdraw(self, ticket: Hashable) -> Hashable | None:
        """``ticket`` no longer wants the audit process (its pass was cancelled). If it
        held it, the turn moves on: returns the new holder, as `release` does."""
        if ticket == self.holder:
            return self.release()
        self._withdrawn.add(ticket)
        return None
