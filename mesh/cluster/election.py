"""Raft-style coordinator election as a sans-IO, deterministic state machine.

Inputs are `tick()` (one abstract unit of time), `step(message)` and the local
requests `bootstrap`, `leave`, `add_peer`. Each returns the messages to send as
`(destination, message)` pairs; the caller delivers them however it likes. No
clocks, sockets or threads in here (the style of etcd-io/raft), so the simulator
in tests/cluster drives thousands of nodes-steps per second with a virtual clock.

What it implements:
- terms and votes, persisted (`Storage.save`) before any message that depends on
  them is returned, so a granted vote survives a crash;
- randomized election timeouts in [election_ticks, 2*election_ticks) from an
  injected `random.Random`;
- pre-vote: a node first asks whether it could win, without raising its term, so a
  node that was cut off cannot disrupt a healthy coordinator when it comes back;
- check-quorum: a coordinator that has not heard from a majority within an election
  timeout steps down; a node that heard from a live coordinator within that time
  ignores vote requests (the coordinator's lease);
- membership by key: the configuration lives in a tiny replicated log and names the
  admitted members (node ids, most senior first) and the voters among them. A key
  that is not a member keeps asking the coordinator to admit it (`JoinRequest`); the
  coordinator's `Admission` rule (mesh/cluster/admission.py) decides. There are at
  most `max_voters` voters, chosen by seniority: a new member gets a vote only while
  a seat is free, and when a voter leaves or is removed the most senior live member
  without a vote is promoted. The other members are learners: they replicate the log
  and do not count for quorums, so keys minted by a holder of the secret never reach
  a quorum. The voters change one node at a time (Raft single-server change), only
  through the coordinator, and only committed configurations count (for quorums and
  for who may campaign). A coordinator proposes a change only when no other change is
  pending and it has committed an entry of its own term (the no-op it appends on
  taking office). `leave()` asks it to take this node's vote, so a graceful exit is
  not a failure (the node stays a member);
- only members speak: an Append or a VoteRequest from a node that is not a voter in
  this node's current configuration (the committed one and any later entries) is
  ignored, and so is any other termed message from a node that is a member in no
  entry of the log, or of a higher term than ours from a member that is no voter (a
  learner's term only ever comes from the voters); no term adopted, no leader followed,
  no vote given. A member that
  lags may not yet hold the entries that made its new coordinator a voter: it asks the
  voters it knows (`VouchRequest`) and follows that coordinator for that term once
  one of them answers that it follows it too (`Vouched`). Raft trusts its voters, not
  Byzantine ones; a key that is unknown to the log is trusted with nothing. A node
  that is not yet a member of its own log (it is joining) follows whoever replicates
  to it first;
- removal of dead voters: the caller reports which nodes its failure detector
  declares dead (`set_dead`); a coordinator removes a voter that has stayed dead
  for `remove_dead_ticks` through the same single-server change, so the
  survivors of a crash keep a majority for the next one, and the seat goes to the
  most senior live learner. A removed node stays a member: when it comes back it
  replicates as a learner, and gets a vote again when a seat is free. A member
  without a vote that stays dead for `forget_dead_ticks` (days, not seconds) is
  removed from the members, so stale keys do not fill the member slots; if it comes
  back it asks to join again like a new key;
- a member that gave up its vote (`leave`) says so in every AppendResponse
  (`no_vote`), so no coordinator, of this term or a later one, promotes it again.

At most one coordinator per term: a candidate needs votes from a majority of its
committed configuration, each node votes once per term (persisted), and two
configurations that a node can hold at the same time differ by at most one voter,
so any two of their majorities intersect.

Two nodes: the majority of two is two. When one side disappears the survivor can
neither keep nor win the coordinator role (check-quorum makes a coordinator that
lost its only peer step down within one election timeout). It cannot tell a
crashed peer from a network split, and if both sides went on alone there would be
two coordinators issuing conflicting placements. The cluster waits until the peer
returns, or until a third device joins (3 nodes tolerate one failure). See
docs/cluster.md.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import structlog

from mesh.cluster.messages import (
    Append,
    AppendResponse,
    Entry,
    JoinRequest,
    LeaveRequest,
    Message,
    VoteRequest,
    VoteResponse,
    Vouched,
    VouchRequest,
)
from mesh.cluster.admission import Admission, Verdict
from mesh.cluster.bounds import MAX_MEMBERS
from mesh.cluster.persistence import HardState, Storage

log = structlog.get_logger("mesh.cluster.election")

Outbox = list[tuple[str, Message]]


class Role(str, Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    COORDINATOR = "coordinator"


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    join_retry_ticks: int = 5
    pre_vote: bool = True
    check_quorum: bool = True
    remove_dead_ticks: int = 0  # 0: never remove a voter unless it leaves
    forget_dead_ticks: int = 0  # 0: never; a member without a vote dead this long is removed from the members
    campaign: bool = True  # False: this node votes but never stands for coordinator
    max_voters: int = 3  # seats with a vote; later members are learners until one frees


@dataclass(slots=True)
class _Progress:
    next: int
    match: int = 0


@dataclass(frozen=True, slots=True)
class ElectionStatus:
    node_id: str
    term: int
    role: Role
    coordinator: str | None
    voters: tuple[str, ...]
    commit: int
    last_index: int
    members: tuple[str, ...] = ()


VOUCH_MEMORY = 8  # vouch questions and answers remembered (a few terms' worth)


def quorum(n: int) -> int:
    return n // 2 + 1


class Election:
    def __init__(
        self,
        node_id: str,
        storage: Storage,
        rng: random.Random,
        config: ElectionConfig = ElectionConfig(),
        peers: tuple[str, ...] = (),
        admission: Admission | None = None,
    ) -> None:
        self.id = node_id
        self.storage = storage
        self.rng = rng
        self.cfg = config
        self.admission = admission or Admission()
        hard = storage.load()
        self.term = hard.term
        self.voted_for = hard.voted_for
        self.commit = hard.commit
        self.log: list[Entry] = list(hard.log)
        self._saved = hard
        self.role = Role.FOLLOWER
        self.leader: str | None = None
        self.peers: set[str] = set(peers) - {node_id}
        self.wants_membership = True
        self._outbox: Outbox = []
        self._votes: dict[str, bool] = {}
        self._progress: dict[str, _Progress] = {}
        self._active: set[str] = set()
        self._ticks = 0
        self._heard: dict[str, int] = {}  # coordinator: member -> tick of its last AppendResponse
        self._declined: set[str] = set()  # coordinator: members that gave up their vote (never promoted)
        self._vouch_asked: dict[tuple[int, str], int] = {}  # (term, node) -> tick we asked about it
        self._vouched: list[tuple[int, str]] = []  # (term, node) a known voter follows
        self._last_vouch_tick = -1
        self._dead_ticks: dict[str, int] = {}
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._join_elapsed = 0
        self._timeout = self._random_timeout()
        self.voters: tuple[str, ...] = ()
        self.members: tuple[str, ...] = ()
        self.voters, self.members = self._committed_config()

    # ---- queries -------------------------------------------------------------------

    @property
    def last_index(self) -> int:
        return len(self.log)

    @property
    def is_coordinator(self) -> bool:
        return self.role is Role.COORDINATOR

    @property
    def is_voter(self) -> bool:
        return self.id in self.voters

    @property
    def is_member(self) -> bool:
        return self.id in self.members

    @property
    def membership_settled(self) -> bool:
        """This node is where it asked to be: a member if it wants to take part, no voter if it left."""
        return self.is_member if self.wants_membership else not self.is_voter

    def pending(self) -> tuple[str, ...]:
        """Keys that asked to join and wait for an approval (ask mode), oldest first."""
        return self.admission.pending()

    def status(self) -> ElectionStatus:
        return ElectionStatus(
            self.id, self.term, self.role, self.leader, self.voters, self.commit, self.last_index, self.members
        )

    def term_at(self, index: int) -> int:
        return self.log[index - 1].term if index > 0 else 0

    # ---- local inputs --------------------------------------------------------------

    def bootstrap(self, voters: tuple[str, ...]) -> None:
        """Start a brand-new cluster whose first configuration is `voters`.

        Only a node with an empty log may bootstrap; every founding node must be
        given the same `voters`. A node that starts later joins instead.
        """
        if self.log:
            return
        founders = tuple(sorted(voters))
        self.log = [Entry(0, founders, founders)]
        self.commit = 1
        self.peers |= set(voters) - {self.id}
        self._apply()
        self._persist()

    def add_peer(self, node_id: str) -> None:
        """A hint that `node_id` exists (discovery, static peer); used to find the coordinator."""
        if node_id != self.id:
            self.peers.add(node_id)

    def leave(self) -> Outbox:
        """Ask to be removed from the voting configuration; retried on ticks until done."""
        self.wants_membership = False
        self._request_membership_change()
        return self._flush()

    def join(self) -> Outbox:
        """Ask (again) for a vote, e.g. after an earlier `leave()`; retried until a member."""
        self.wants_membership = True
        self._request_membership_change(force=True)
        return self._flush()

    def approve(self, node_id: str) -> Outbox:
        """An existing member approved `node_id` (ask mode); a coordinator admits it at once
        if it is waiting, any other node when it next asks."""
        waiting = node_id in self.admission.pending()
        self.admission.approve(node_id)
        if waiting and self.role is Role.COORDINATOR and node_id not in self._latest_config()[1]:
            self._on_membership_request(JoinRequest(node_id))
        return self._flush()

    def set_dead(self, nodes: Iterable[str]) -> None:
        """The nodes the failure detector declares dead right now (all of them, every tick).

        A node counts as dead for as many ticks as it stays in this set; any message
        from it resets the count. Only a coordinator acts on it (`remove_dead_ticks`).
        """
        dead = set(nodes) - {self.id}
        self._dead_ticks = {n: self._dead_ticks.get(n, 0) for n in dead}

    def observe_term(self, term: int) -> Outbox:
        """A command of `term` was accepted (fencing): adopt the term like any Raft message.

        A coordinator of `term` exists, so a lower-term coordinator here steps down, and the
        term is persisted: after a restart this node still refuses the older terms.
        """
        if term > self.term:
            self._become_follower(term, None)
        return self._flush()

    def tick(self) -> Outbox:
        self._ticks += 1
        for node in self._dead_ticks:
            self._dead_ticks[node] += 1
        if self.role is Role.COORDINATOR:
            self._tick_coordinator()
        else:
            self._election_elapsed += 1
            if self.is_voter and self.cfg.campaign and self._election_elapsed >= self._timeout:
                self._campaign(pre=self.cfg.pre_vote)
        if self._membership_pending():
            self._join_elapsed += 1
            if self._join_elapsed >= self.cfg.join_retry_ticks:
                self._request_membership_change()
        return self._flush()

    # ---- messages ------------------------------------------------------------------

    def step(self, m: Message) -> Outbox:
        if m.src == self.id:
            log.warning("election.self_named_refused", node=self.id, message=type(m).__name__)
            return self._flush()
        if isinstance(m, JoinRequest | LeaveRequest):
            self._on_membership_request(m)
            return self._flush()
        if isinstance(m, VouchRequest):
            self._on_vouch_request(m)
            return self._flush()
        if isinstance(m, Vouched):
            self._on_vouched(m)
            return self._flush()
        if not self._may_speak(m):
            return self._flush()
        self.add_peer(m.src)
        if m.src in self._dead_ticks:
            self._dead_ticks[m.src] = 0  # it just spoke: not dead, whatever the detector lags behind
        if m.term > self.term:
            if isinstance(m, VoteRequest) and self._in_lease():
                return self._flush()
            pre_vote = isinstance(m, VoteRequest) and m.pre
            granted_pre = isinstance(m, VoteResponse) and m.pre and m.granted
            if not (pre_vote or granted_pre):
                self._become_follower(m.term, m.src if isinstance(m, Append) else None)
        elif m.term < self.term:
            if isinstance(m, Append):
                log.warning("fence.stale_term", node=self.id, src=m.src, term=m.term, seen=self.term)
                self._answer_append(m.src, False, 0, self.commit)
            elif isinstance(m, VoteRequest) and m.pre:
                self._send(m.src, VoteResponse(self.term, self.id, False, pre=True))
            return self._flush()
        if isinstance(m, VoteRequest):
            self._on_vote_request(m)
        elif isinstance(m, VoteResponse):
            self._on_vote_response(m)
        elif isinstance(m, Append):
            self._on_append(m)
        elif isinstance(m, AppendResponse):
            self._on_append_response(m)
        return self._flush()

    # ---- elections -----------------------------------------------------------------

    def _in_lease(self) -> bool:
        return (
            self.cfg.check_quorum
            and self.leader is not None
            and self._election_elapsed < self.cfg.election_ticks
        )

    def _random_timeout(self) -> int:
        return self.cfg.election_ticks + self.rng.randrange(self.cfg.election_ticks)

    def _campaign(self, pre: bool) -> None:
        self._election_elapsed = 0
        self._timeout = self._random_timeout()
        self.leader = None
        self._votes = {}
        if pre:
            self.role = Role.PRE_CANDIDATE
            term = self.term + 1
        else:
            self.role = Role.CANDIDATE
            self.term += 1
            self.voted_for = self.id
            term = self.term
        log.debug("election.campaign", node=self.id, term=term, pre=pre)
        self._record_vote(self.id, True, pre)
        if self.role is Role.COORDINATOR or self.role is not (Role.PRE_CANDIDATE if pre else Role.CANDIDATE):
            return
        request = VoteRequest(term, self.id, self.last_index, self.term_at(self.last_index), pre)
        for voter in self.voters:
            if voter != self.id:
                self._send(voter, request)

    def _record_vote(self, voter: str, granted: bool, pre: bool) -> None:
        if voter not in self.voters:
            return
        self._votes[voter] = granted
        need = quorum(len(self.voters))
        if sum(self._votes.values()) >= need:
            if pre:
                self._campaign(pre=False)
            else:
                self._become_coordinator()
        elif sum(not g for g in self._votes.values()) >= need:
            self._become_follower(self.term, None)

    def _log_up_to_date(self, last_index: int, last_term: int) -> bool:
        mine = self.term_at(self.last_index)
        return last_term > mine or (last_term == mine and last_index >= self.last_index)

    def _on_vote_request(self, m: VoteRequest) -> None:
        if m.pre:
            can_vote = m.term > self.term
        else:
            can_vote = self.voted_for == m.src or (self.voted_for is None and self.leader is None)
        granted = can_vote and self._log_up_to_date(m.last_index, m.last_term)
        if granted and not m.pre:
            self.voted_for = m.src
            self._election_elapsed = 0
            self._persist()  # the vote is durable before the response exists
        self._send(m.src, VoteResponse(m.term if granted else self.term, self.id, granted, m.pre))

    def _on_vote_response(self, m: VoteResponse) -> None:
        if m.pre and self.role is Role.PRE_CANDIDATE:
            self._record_vote(m.src, m.granted, pre=True)
        elif not m.pre and self.role is Role.CANDIDATE:
            self._record_vote(m.src, m.granted, pre=False)

    def _become_follower(self, term: int, leader: str | None) -> None:
        if term != self.term:
            self.term = term
            self.voted_for = None
        if self.role is Role.COORDINATOR:
            log.info("election.step_down", node=self.id, term=self.term)
        self.role = Role.FOLLOWER
        self.leader = leader
        self._election_elapsed = 0
        self._timeout = self._random_timeout()
        self._progress.clear()
        self._declined.clear()

    def _become_coordinator(self) -> None:
        self.role = Role.COORDINATOR
        self.leader = self.id
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._active = set()
        self._progress = {}
        self.log.append(Entry(self.term))  # commit something of our own term first
        log.info("election.elected", node=self.id, term=self.term, voters=self.voters)
        self._maybe_commit()
        self._broadcast_append()

    # ---- coordinator ---------------------------------------------------------------

    def _tick_coordinator(self) -> None:
        self._heartbeat_elapsed += 1
        if self._heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_append()
        self._remove_dead_voter()
        self._forget_dead_member()
        self._promote()
        self._election_elapsed += 1
        if self._election_elapsed >= self.cfg.election_ticks:
            self._election_elapsed = 0
            if self.cfg.check_quorum:
                heard = len(self._active & set(self.voters)) + (self.id in self.voters)
                self._active = set()
                if heard < quorum(len(self.voters)):
                    log.warning("election.lost_quorum", node=self.id, term=self.term, heard=heard)
                    self._become_follower(self.term, None)

    def _targets(self) -> set[str]:
        return (set(self.members) | set(self._latest_config()[1])) - {self.id}

    def _broadcast_append(self) -> None:
        for node in sorted(self._targets()):
            self._send_append(node)

    def _send_append(self, node: str) -> None:
        pr = self._progress.setdefault(node, _Progress(next=self.last_index + 1))
        prev = pr.next - 1
        entries = tuple(self.log[prev:])
        self._send(node, Append(self.term, self.id, prev, self.term_at(prev), entries, self.commit))

    def _on_append_response(self, m: AppendResponse) -> None:
        if self.role is not Role.COORDINATOR:
            return
        self._active.add(m.src)
        self._heard[m.src] = self._ticks
        if m.no_vote:  # known before `_live` can hold for it: an answer is what makes it live
            self._declined.add(m.src)
        else:
            self._declined.discard(m.src)
        pr = self._progress.setdefault(m.src, _Progress(next=self.last_index + 1))
        if m.success:
            if m.match > self.last_index:
                # We never sent that much: a follower that claims it would count toward a
                # commit it does not hold, and its next Append would index past our log.
                log.warning("election.implausible_match", node=self.id, src=m.src, match=m.match,
                            last_index=self.last_index)
                return
            if m.match > pr.match:
                pr.match = m.match
                pr.next = m.match + 1
                self._maybe_commit()
        else:
            pr.next = max(pr.match + 1, min(pr.next - 1, m.hint + 1))
            self._send_append(m.src)

    def _maybe_commit(self) -> None:
        if self.role is not Role.COORDINATOR:
            return
        need = quorum(len(self.voters))
        for n in range(self.last_index, self.commit, -1):
            if self.term_at(n) != self.term:
                break
            acks = sum(
                1
                for v in self.voters
                if v == self.id or (v in self._progress and self._progress[v].match >= n)
            )
            if acks >= need:
                self.commit = n
                self._broadcast_append()  # followers learn the new commit at once
                self._apply()
                return

    def _can_change_config(self) -> bool:
        pending = any(e.voters is not None for e in self.log[self.commit :])
        return not pending and self.term_at(self.commit) == self.term

    def _on_membership_request(self, m: JoinRequest | LeaveRequest) -> None:
        voters, members = self._latest_config()
        if isinstance(m, JoinRequest) and m.src not in members:
            # Every node records the request (so its status lists a pending key); only the
            # coordinator acts on the verdict.
            verdict = self.admission.consider(m.src)
            if self.role is not Role.COORDINATOR:
                return
            if verdict is not Verdict.ADMIT:
                log.info("election.join_not_admitted", node=self.id, key=m.src, verdict=verdict.value,
                         mode=self.admission.mode.value)
                return
            if len(members) >= MAX_MEMBERS:
                log.warning("election.members_full", node=self.id, key=m.src, members=len(members))
                return
            if not self._can_change_config():
                return
            seat = len(voters) < self.cfg.max_voters
            log.info("election.admitting", node=self.id, key=m.src, mode=self.admission.mode.value, voter=seat)
            self._propose(set(voters) | ({m.src} if seat else set()), members + (m.src,), "admit", m.src)
            return
        if self.role is not Role.COORDINATOR:
            return
        if m.src != self.id:
            # The requester learns from the log whether it is (still) a voter. A coordinator
            # that leaves itself has nobody to tell: an Append to itself would make it step
            # down with itself as leader, and as the last voter it would never campaign again.
            self._send_append(m.src)
        if isinstance(m, JoinRequest):
            self._declined.discard(m.src)  # a member that asks again wants its vote back
            return  # it gets a seat through `_promote`, when one is free
        self._declined.add(m.src)
        if m.src not in voters or len(voters) == 1 or not self._can_change_config():
            return
        self._propose(set(voters) - {m.src}, members, "leave", m.src)

    def _live(self, node: str) -> bool:
        """A member the coordinator heard from within an election timeout, and not declared dead."""
        heard = self._heard.get(node)
        return (heard is not None and self._ticks - heard < self.cfg.election_ticks
                and not self._dead_ticks.get(node, 0))

    def _promote(self) -> None:
        """Give a free seat to the most senior live member without a vote (one change at a time)."""
        voters, members = self._latest_config()
        if len(voters) >= self.cfg.max_voters or not self._can_change_config():
            return
        for node in members:
            if node not in voters and node != self.id and node not in self._declined and self._live(node):
                self._propose(set(voters) | {node}, members, "promote", node)
                return

    def _remove_dead_voter(self) -> None:
        """Remove one voter that has been dead for `remove_dead_ticks`, if the change can commit."""
        grace = self.cfg.remove_dead_ticks
        if not grace or not self._can_change_config():
            return
        dead = [v for v in self.voters if v != self.id and self._dead_ticks.get(v, 0) >= grace]
        if not dead:
            return
        # Propose only what the live voters can commit: an entry that cannot reach a
        # majority would linger and could be committed by a later term, after the node
        # has come back.
        alive = [v for v in self.voters if v == self.id or not self._dead_ticks.get(v, 0)]
        if len(alive) < quorum(len(self.voters)):
            return
        gone = min(dead, key=lambda v: (-self._dead_ticks[v], v))
        self._propose(set(self.voters) - {gone}, self.members, "dead", gone)  # it stays a member

    def _forget_dead_member(self) -> None:
        """Remove from the members one that has no vote and has been dead for
        `forget_dead_ticks`: stale keys would fill the member slots. If it comes back it
        asks to join again, as a new key does (in ask mode, it waits for an approval)."""
        grace = self.cfg.forget_dead_ticks
        if not grace or not self._can_change_config():
            return
        voters, members = self._latest_config()
        dead = [n for n in members if n not in voters and n != self.id and self._dead_ticks.get(n, 0) >= grace]
        if not dead:
            return
        gone = min(dead, key=lambda n: (-self._dead_ticks[n], n))
        self._propose(set(voters), tuple(n for n in members if n != gone), "forgotten", gone)

    def _propose(self, voters: set[str], members: tuple[str, ...], reason: str, about: str) -> None:
        self.log.append(Entry(self.term, tuple(sorted(voters)), members))
        log.info("election.config_proposed", node=self.id, term=self.term, voters=sorted(voters),
                 members=len(members), reason=reason, about=about)
        self._maybe_commit()
        self._broadcast_append()

    # ---- follower ------------------------------------------------------------------

    def _on_append(self, m: Append) -> None:
        if self.role is not Role.FOLLOWER:
            self._become_follower(self.term, m.src)
        self.leader = m.src
        self._election_elapsed = 0
        if m.prev_index > self.last_index or self.term_at(m.prev_index) != m.prev_term:
            hint = min(self.commit, m.prev_index - 1)
            self._answer_append(m.src, False, 0, hint)
            return
        for offset, entry in enumerate(m.entries):
            index = m.prev_index + 1 + offset
            if index <= self.last_index and self.term_at(index) == entry.term:
                continue
            if index <= self.last_index:
                if index <= self.commit:
                    # An honest coordinator holds every committed entry (Raft's leader
                    # completeness), so this Append is forged or broken: refuse all of it.
                    log.warning("election.committed_overwrite_refused", node=self.id, src=m.src, term=m.term,
                                index=index, commit=self.commit)
                    self._answer_append(m.src, False, 0, self.commit)
                    return
                del self.log[index - 1 :]
            self.log.append(entry)
        match = m.prev_index + len(m.entries)
        if min(m.commit, match) > self.commit:
            self.commit = min(m.commit, match)
            self._apply()
        self._answer_append(m.src, True, match)

    def _answer_append(self, to: str, success: bool, match: int, hint: int = 0) -> None:
        # Every answer restates whether this node gave up its vote: the coordinator that
        # took its LeaveRequest may be gone, and its successor must not promote it.
        self._send(to, AppendResponse(self.term, self.id, success, match, hint, no_vote=not self.wants_membership))

    # ---- membership ----------------------------------------------------------------

    def _committed_config(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(voters, members) of the latest committed configuration."""
        for entry in reversed(self.log[: self.commit]):
            if entry.voters is not None:
                return entry.voters, entry.members or entry.voters
        return (), ()

    def _latest_config(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(voters, members) of the latest configuration in the log, committed or not."""
        for entry in reversed(self.log):
            if entry.voters is not None:
                return entry.voters, entry.members or entry.voters
        return (), ()

    def _apply(self) -> None:
        before = set(self.voters)
        self.voters, self.members = self._committed_config()
        for node in self.members:
            self.admission.admitted(node)
        self.peers |= set(self.members) - {self.id}
        if set(self.voters) == before:
            return
        log.info("election.config_committed", node=self.id, term=self.term, voters=self.voters,
                 members=len(self.members))
        if self.role is Role.COORDINATOR and self.id not in self.voters:
            self._become_follower(self.term, None)

    # ---- who may speak ---------------------------------------------------------------

    def _current_voters(self) -> set[str]:
        """Voters of the committed configuration and of every entry after it: the nodes
        that can be coordinator of a term this node might be asked to follow."""
        start = 0
        for index in range(self.commit, 0, -1):
            if self.log[index - 1].voters is not None:
                start = index - 1
                break
        return {v for e in self.log[start:] if e.voters is not None for v in e.voters}

    def _known_members(self) -> set[str]:
        return {n for e in self.log if e.members is not None for n in e.members}

    def _may_speak(self, m: Message) -> bool:
        """Whether this termed message's sender may move our term, leader or vote (see the
        module docstring: only members speak)."""
        # A node that is not yet a member of its own log is joining: it has nothing to
        # protect and no one to check with, so it follows the first coordinator that
        # replicates to it, and votes (a vote counts only for a candidate that has it as a voter).
        joining = self.id not in self._latest_config()[1]
        if isinstance(m, Append):
            if joining or m.src in self._current_voters() or (m.term, m.src) in self._vouched:
                return True
            if m.term >= self.term:
                self._ask_vouch(m.term, m.src)
        elif isinstance(m, VoteRequest):
            if joining or m.src in self._current_voters():
                return True
        elif m.src in self._known_members() and (m.term <= self.term or m.src in self._current_voters()):
            # a learner's term only ever comes from the voters: a higher one from it is a lie
            # (it would depose the coordinator, an election whenever a minted key liked)
            return True
        log.warning("election.not_a_member_refused", node=self.id, peer=m.src, message=type(m).__name__,
                    term=m.term)
        return False

    def _vouchers(self, about: str) -> set[str]:
        return (set(self.voters) | set(self._latest_config()[0])) - {self.id, about}

    def _ask_vouch(self, term: int, about: str) -> None:
        # At most one round per tick, and one per (term, node) per election timeout: an
        # unknown key cannot make us spray questions.
        asked = self._vouch_asked.get((term, about))
        if self._last_vouch_tick == self._ticks or (asked is not None and self._ticks - asked < self.cfg.election_ticks):
            return
        self._last_vouch_tick = self._ticks
        self._vouch_asked.pop((term, about), None)
        self._vouch_asked[(term, about)] = self._ticks
        while len(self._vouch_asked) > VOUCH_MEMORY:
            del self._vouch_asked[next(iter(self._vouch_asked))]
        for voter in sorted(self._vouchers(about)):
            self._send(voter, VouchRequest(self.id, about, term))

    def _on_vouch_request(self, m: VouchRequest) -> None:
        follows = self.term == m.term and self.leader == m.about
        if follows and (self.role is Role.FOLLOWER or (self.is_coordinator and m.about == self.id)):
            self._send(m.src, Vouched(self.id, m.about, m.term))

    def _on_vouched(self, m: Vouched) -> None:
        key = (m.term, m.about)
        if key not in self._vouch_asked or m.src not in self._vouchers(m.about) or key in self._vouched:
            return
        log.info("election.coordinator_vouched", node=self.id, coordinator=m.about, term=m.term, voucher=m.src)
        self._vouched.append(key)
        del self._vouched[:-VOUCH_MEMORY]

    # ---- membership requests ---------------------------------------------------------

    def _leader_recent(self) -> bool:
        return self.leader is not None and self._election_elapsed < self.cfg.election_ticks

    def _membership_pending(self) -> bool:
        # A member that has not heard from a coordinator for a while also asks: it may
        # have missed entries, and the coordinator answers a member with an Append.
        if not self.membership_settled:
            return True
        return self.role is not Role.COORDINATOR and not self._leader_recent()

    def _request_membership_change(self, force: bool = False) -> None:
        self._join_elapsed = 0
        if not force and not self._membership_pending():
            return
        request = JoinRequest(self.id) if self.wants_membership else LeaveRequest(self.id)
        if self.role is Role.COORDINATOR:
            self._on_membership_request(request)
            return
        targets = [self.leader] if self._leader_recent() else sorted(self.peers)
        for node in targets:
            self._send(node, request)

    # ---- output --------------------------------------------------------------------

    def _send(self, to: str, m: Message) -> None:
        if to == self.id:
            # Only a message that names us as its sender leads here (`step` refuses those);
            # a reply to ourselves would be delivered back as a peer's word.
            log.error("election.self_addressed", node=self.id, message=type(m).__name__)
            return
        self._outbox.append((to, m))

    def _persist(self) -> None:
        state = HardState(self.term, self.voted_for, self.commit, tuple(self.log))
        if state != self._saved:
            self.storage.save(state)
            self._saved = state

    def _flush(self) -> Outbox:
        self._persist()
        out, self._outbox = self._outbox, []
        return out
