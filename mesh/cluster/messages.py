"""Messages of the election protocol: plain frozen dataclasses, no I/O.

`src` is the sender's node id. Every message except the membership requests
carries the sender's term; receivers fence on it (see `election.Election.step`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    """One replicated log entry: a configuration (`voters`) or a no-op (`voters is None`).

    A configuration names the admitted `members` (node ids, in order of admission: the
    most senior first) and the `voters` among them. A member that is not a voter is a
    learner: it replicates the log but does not count for quorums. A configuration
    written before members existed (`members` None) has members = voters.

    A coordinator appends a no-op when it takes office so that it can commit an
    entry of its own term before it changes the configuration.
    """

    term: int
    voters: tuple[str, ...] | None = None
    members: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.voters is not None and self.members is None:
            object.__setattr__(self, "members", self.voters)


def entry_to_list(e: Entry) -> list:
    if e.voters is None:
        return [e.term, None, None]
    return [e.term, list(e.voters), list(e.members or e.voters)]


def entry_from_list(item: list) -> Entry:
    """An entry as `entry_to_list` writes it; `[term, voters]` (before members) has members = voters."""
    if not isinstance(item, list | tuple) or len(item) not in (2, 3):
        raise ValueError("bad log entry")
    term, voters = item[0], item[1]
    members = item[2] if len(item) == 3 else None
    if type(term) is not int:
        raise ValueError("bad entry term")
    if voters is None:
        return Entry(term)
    if not all(isinstance(v, str) for v in voters) or not (
            members is None or all(isinstance(v, str) for v in members)):
        raise ValueError("bad configuration")
    return Entry(term, tuple(voters), tuple(members) if members is not None else None)


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
    """Node -> coordinator. ``no_vote``: the sender gave up its vote (`Election.leave`) and
    says so with every answer, so a coordinator of any later term knows it before it could
    promote it (a coordinator's memory of a LeaveRequest ends with its term)."""

    term: int
    src: str
    success: bool
    match: int
    hint: int = 0
    no_vote: bool = False


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """A node asks the coordinator to admit it as a member (and a voter, if a seat is free)."""

    src: str


@dataclass(frozen=True, slots=True)
class LeaveRequest:
    """A node asks the coordinator to remove it from the voters (graceful leave: not a failure).

    It stays a member: when it comes back it is a learner, promoted when a seat is free."""

    src: str


@dataclass(frozen=True, slots=True)
class VouchRequest:
    """A member asks a voter it knows: is `about` your coordinator in `term`?

    Sent when an Append of `term` comes from a node this member's log does not know as
    a voter (it may have missed the entries that admitted and promoted it). Carries no
    term of its own: asking never moves anyone's term.
    """

    src: str
    about: str
    term: int


@dataclass(frozen=True, slots=True)
class Vouched:
    """A voter's answer, sent only when true: `about` is its coordinator in `term`."""

    src: str
    about: str
    term: int


Message = VoteRequest | VoteResponse | Append | AppendResponse | JoinRequest | LeaveRequest | VouchRequest | Vouched
TERMED = (VoteRequest, VoteResponse, Append, AppendResponse)
