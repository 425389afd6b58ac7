"""Messages of the election protocol: plain frozen dataclasses, no I/O.

`src` is the sender's node id. Every message except the membership requests
carries the sender's term; receivers fence on it (see `election.Election.step`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    """One replicated log entry: a configuration (`voters`) or a no-op (`voters is None`).

    A coordinator appends a no-op when it takes office so that it can commit an
    entry of its own term before it changes the configuration.
    """

    term: int
    voters: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class VoteRequest:
    term: int
    src: str
    last_index: int
    last_term: int
    pre: bool = False


@dataclass(frozen=True, slots=True)
class VoteResponse:
    term: int
    src: str
    granted: bool
    pre: bool = False


@dataclass(frozen=True, slots=True)
class Append:
    """Coordinator -> node: log entries (often none: a heartbeat) and the commit index."""

    term: int
    src: str
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int


@dataclass(frozen=True, slots=True)
class AppendResponse:
    term: int
    src: str
    success: bool
    match: int
    hint: int = 0


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """A node asks the coordinator to add it to the voting configuration."""

    src: str


@dataclass(frozen=True, slots=True)
class LeaveRequest:
    """A node asks the coordinator to remove it (graceful leave: not a failure)."""

    src: str


Message = VoteRequest | VoteResponse | Append | AppendResponse | JoinRequest | LeaveRequest
TERMED = (VoteRequest, VoteResponse, Append, AppendResponse)
