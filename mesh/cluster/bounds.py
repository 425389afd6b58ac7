"""Sane ranges for the numbers a peer writes into cluster and plan messages.

A term or a plan version only ever grows by one step at a time, and a cluster lives for
far fewer than 2**53 elections. A peer that claims term 2**64-1 is lying or broken: if we
adopted it, our next campaign could not be encoded and no election would ever happen
again, not even after a restart (the term is persisted). So every termed message is
checked here before the election or the fence sees it, and refused with a typed
`ImplausibleMessage` that the caller logs and drops; the node keeps serving.

The bounds:
- a term is an int in [0, MAX_TERM], and at most MAX_TERM_STEP above the local term
  (a real cluster moves one term per election; 65536 missed elections is not a thing);
- a log index (prev_index, commit, match, last_index, hint) is an int in [0, MAX_INDEX];
- an Append carries at most MAX_ENTRIES entries, none of a term above the Append's own,
  each configuration at most MAX_MEMBERS members of at most MAX_NODE_ID characters, no
  id twice, and its voters (at least one) among its members;
- a plan version is an int in [0, MAX_PLAN_VERSION), and at most MAX_PLAN_VERSION_STEP
  above the version of the plan this node follows.
"""

from __future__ import annotations

from typing import Any

from mesh.cluster import messages as m

MAX_TERM = 2**53
MAX_TERM_STEP = 2**16
MAX_INDEX = 2**40
MAX_ENTRIES = 1024
MAX_MEMBERS = 64
MAX_NODE_ID = 128
MAX_PLAN_VERSION = 10**9
MAX_PLAN_VERSION_STEP = 2**16


class ImplausibleMessage(ValueError):
    """A peer's message holds a number or a size outside the range an honest node produces."""


def _int(value: Any, name: str, high: int) -> int:
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise ImplausibleMessage(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= high:
        raise ImplausibleMessage(f"{name} {value} is outside [0, {high}]")
    return value


def _node_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NODE_ID:
        raise ImplausibleMessage(f"{name} must be a node id of 1..{MAX_NODE_ID} characters")
    return value


def check_term(term: Any, local_term: int, name: str = "term") -> int:
    """`term` as an int if a peer may plausibly hold it while we are at `local_term`."""
    _int(term, name, MAX_TERM)
    if term > local_term + MAX_TERM_STEP:
        raise ImplausibleMessage(
            f"{name} {term} jumps more than {MAX_TERM_STEP} over our term {local_term}"
        )
    return term


def check_message(msg: m.Message, local_term: int, self_id: str = "") -> None:
    """Raise ImplausibleMessage unless `msg` (an election message from a peer) is in range.

    `self_id` is our node id: a peer's message never names us as its sender.
    """
    src = _node_id(msg.src, "src")
    if self_id and src == self_id:
        raise ImplausibleMessage(f"a peer's {type(msg).__name__} names us ({self_id}) as its sender")
    if isinstance(msg, m.JoinRequest | m.LeaveRequest):
        return
    if isinstance(msg, m.VouchRequest | m.Vouched):
        _node_id(msg.about, "about")
        check_term(msg.term, local_term)
        return
    check_term(msg.term, local_term)
    if isinstance(msg, m.VoteRequest):
        _int(msg.last_index, "last_index", MAX_INDEX)
        _int(msg.last_term, "last_term", msg.term)  # a candidate's log holds no later term
    elif isinstance(msg, m.AppendResponse):
        _int(msg.match, "match", MAX_INDEX)
        _int(msg.hint, "hint", MAX_INDEX)
    elif isinstance(msg, m.Append):
        _int(msg.prev_index, "prev_index", MAX_INDEX)
        _int(msg.prev_term, "prev_term", msg.term)
        _int(msg.commit, "commit", MAX_INDEX)
        if len(msg.entries) > MAX_ENTRIES:
            raise ImplausibleMessage(f"an Append of {len(msg.entries)} entries (at most {MAX_ENTRIES})")
        for entry in msg.entries:
            _int(entry.term, "entry term", msg.term)
            if entry.voters is not None:
                check_config(entry.voters, entry.members or entry.voters)


def check_config(voters: tuple[str, ...], members: tuple[str, ...]) -> None:
    """Raise ImplausibleMessage unless (voters, members) is a configuration an honest node writes."""
    if not 0 < len(members) <= MAX_MEMBERS:
        raise ImplausibleMessage(f"a configuration of {len(members)} members (1..{MAX_MEMBERS})")
    for member in members:
        _node_id(member, "member")
    if len(set(members)) != len(members) or len(set(voters)) != len(voters):
        raise ImplausibleMessage("a configuration that names a node twice")
    if not voters or not set(voters) <= set(members):
        raise ImplausibleMessage("a configuration whose voters are not among its members")


def check_plan_version(version: Any, current: int | None) -> int:
    """`version` as an int if it is a plausible next plan version after `current`.

    `current` is the version of the plan this node follows, or None when it follows
    none yet (a fresh or restarted node takes any version in range).
    """
    _int(version, "plan version", MAX_PLAN_VERSION - 1)
    if current is not None and version > current + MAX_PLAN_VERSION_STEP:
        raise ImplausibleMessage(
            f"plan version {version} jumps more than {MAX_PLAN_VERSION_STEP} over ours ({current})"
        )
    return version
