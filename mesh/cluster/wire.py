"""Actor messages of the cluster service, and conversion to/from the election's messages.

The election machine stays free of the actor runtime; these registered dataclasses are
what travels between nodes (msgpack via `actors`, inside the authenticated channel).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors import message

from mesh.cluster import messages as m

_KINDS = ("vote", "vote_resp", "append", "append_resp", "join", "leave", "vouch", "vouched")


@message("mesh.cluster.Raft")
@dataclass
class RaftWire:
    kind: str
    src: str
    term: int = 0
    a: int = 0  # last_index | prev_index | match
    b: int = 0  # last_term | prev_term | hint | commit
    c: int = 0  # commit (append)
    flag: bool = False  # pre (vote) | granted (vote_resp) | success (append_resp)
    flag2: bool = False  # pre (vote_resp) | no_vote (append_resp)
    entries: list = field(default_factory=list)  # [[term, voters | None, members | None], ...]
    about: str = ""  # the node a vouch question or answer is about


@message("mesh.cluster.Heartbeat")
@dataclass
class Heartbeat:
    """Sent to every connected peer every heartbeat interval: liveness plus member facts."""

    node_id: str
    name: str = ""
    host: str = ""
    port: int = 0
    backend: str = ""
    device: str = ""
    free_memory: int = 0
    roles: list = field(default_factory=list)
    term: int = 0
    coordinator: str = ""
    configured: bool = False
    leaving: bool = False
    speed: float = 1.0
    api_port: int = 0
    host_id: str = ""  # nodes that share one machine (mesh.sizing.host_id): equal shares
    speed_source: str = ""  # where the speed score came from (measured how, or configured)


@message("mesh.cluster.Admit")
@dataclass
class AdmitRequest:
    """A member approves a key that asked to join (`mesh admit`); told to the coordinator,
    which admits it. Answered with the node id, or a failure that says why not."""

    node_id: str


def to_wire(msg: m.Message) -> RaftWire:
    if isinstance(msg, m.VoteRequest):
        return RaftWire("vote", msg.src, msg.term, msg.last_index, msg.last_term, flag=msg.pre)
    if isinstance(msg, m.VoteResponse):
        return RaftWire("vote_resp", msg.src, msg.term, flag=msg.granted, flag2=msg.pre)
    if isinstance(msg, m.Append):
        entries = [m.entry_to_list(e) for e in msg.entries]
        return RaftWire("append", msg.src, msg.term, msg.prev_index, msg.prev_term, msg.commit, entries=entries)
    if isinstance(msg, m.AppendResponse):
        return RaftWire("append_resp", msg.src, msg.term, msg.match, msg.hint, flag=msg.success, flag2=msg.no_vote)
    if isinstance(msg, m.JoinRequest):
        return RaftWire("join", msg.src)
    if isinstance(msg, m.VouchRequest):
        return RaftWire("vouch", msg.src, msg.term, about=msg.about)
    if isinstance(msg, m.Vouched):
        return RaftWire("vouched", msg.src, msg.term, about=msg.about)
    return RaftWire("leave", msg.src)


def from_wire(w: RaftWire) -> m.Message | None:
    """The election message, or None if the wire form is malformed (ignored by the caller)."""
    try:
        if w.kind == "vote":
            return m.VoteRequest(w.term, w.src, w.a, w.b, bool(w.flag))
        if w.kind == "vote_resp":
            return m.VoteResponse(w.term, w.src, bool(w.flag), bool(w.flag2))
        if w.kind == "append":
            entries = tuple(m.entry_from_list(item) for item in w.entries)
            return m.Append(w.term, w.src, w.a, w.b, entries, w.c)
        if w.kind == "append_resp":
            return m.AppendResponse(w.term, w.src, bool(w.flag), w.a, w.b, bool(w.flag2))
        if w.kind == "join":
            return m.JoinRequest(w.src)
        if w.kind == "leave":
            return m.LeaveRequest(w.src)
        if w.kind == "vouch":
            return m.VouchRequest(w.src, w.about, w.term)
        if w.kind == "vouched":
            return m.Vouched(w.src, w.about, w.term)
    except (TypeError, ValueError):
        return None
    return None
