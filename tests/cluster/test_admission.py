"""Admission by key (issue 17, part 2): attacks by a fresh key pair that holds the secret.

The secret lets a device ask to join; membership is by key, voters are capped and chosen
by seniority, and the election ignores Raft traffic from keys its log does not know.
Pure tests on `Election` and the simulator: no sockets, no sleeps.
"""

from __future__ import annotations

import json
import random

import pytest
from structlog.testing import capture_logs

from cluster_sim import Sim, silenced_logs

from mesh.cluster import messages as m
from mesh.cluster.admission import Admission, AdmissionError, Mode, Verdict
from mesh.cluster.bounds import MAX_MEMBERS, ImplausibleMessage, check_message
from mesh.cluster.election import Election, ElectionConfig, Role
from mesh.cluster.persistence import HardState, MemoryStorage, decode_state, encode_state
from mesh.cluster.wire import from_wire, to_wire

A, B, C = "a", "b", "c"
ROGUE = "f00dfeedf00dfeed"  # a fresh key: proves the secret, is no member


def follower_of_b(node: str = A, admission: Admission | None = None) -> Election:
    """`node` in the founded cluster (a, b, c), following b in term 3."""
    e = Election(node, MemoryStorage(), random.Random(0), ElectionConfig(), admission=admission)
    e.bootstrap((A, B, C))
    e.step(m.Append(3, B, 1, 0, (m.Entry(3),), 2))
    assert (e.term, e.leader, e.commit) == (3, B, 2)
    return e


def coordinator(admission: Admission | None = None, voters: tuple[str, ...] = (A, B, C)) -> Election:
    """a, elected coordinator of `voters` (its no-op committed by b)."""
    e = Election(A, MemoryStorage(), random.Random(0), ElectionConfig(pre_vote=False), admission=admission)
    e.bootstrap(voters)
    while e.role is not Role.CANDIDATE:
        e.tick()
    for voter in voters[1:]:
        e.step(m.VoteResponse(e.term, voter, True))
    assert e.is_coordinator
    if len(voters) > 1:
        e.step(m.AppendResponse(e.term, voters[1], True, e.last_index))
    assert e.commit == e.last_index
    return e


# ---- the election hole ---------------------------------------------------------------------


def test_a_fresh_key_with_the_secret_cannot_make_itself_leader() -> None:
    e = follower_of_b()
    with capture_logs() as logs:
        out = e.step(m.Append(4, ROGUE, 2, 3, (), 2))  # a heartbeat of a higher term
        out += e.step(m.Append(10, ROGUE, 0, 0, (m.Entry(10, (ROGUE,)),), 1))
    assert (e.term, e.leader, e.role) == (3, B, Role.FOLLOWER), "the rogue became our coordinator"
    assert e.voters == (A, B, C) and len(e.log) == 2
    assert not any(isinstance(msg, m.AppendResponse) for _, msg in out)
    refused = [x for x in logs if x["event"] == "election.not_a_member_refused"]
    assert refused and refused[0]["peer"] == ROGUE


def test_a_fresh_key_cannot_win_a_vote_or_raise_a_term() -> None:
    e = follower_of_b()
    for _ in range(e.cfg.election_ticks * 2):  # past the lease: a member's request would be heard
        e.tick()
    out = e.step(m.VoteRequest(5, ROGUE, 99, 4, pre=True))
    out += e.step(m.VoteRequest(5, ROGUE, 99, 4))
    out += e.step(m.AppendResponse(6, ROGUE, True, 0))
    out += e.step(m.VoteResponse(7, ROGUE, False))
    assert e.term == 3 and e.voted_for is None and out == []


def test_a_coordinator_does_not_step_down_for_a_fresh_keys_higher_term() -> None:
    e = coordinator()
    term = e.term
    e.step(m.AppendResponse(term + 1, ROGUE, False, 0))
    e.step(m.VoteResponse(term + 1, ROGUE, False))
    assert e.is_coordinator and e.term == term


# ---- seats by seniority --------------------------------------------------------------------


def test_minted_keys_never_reach_a_quorum() -> None:
    """Ten keys minted by a holder of the secret join a 3-node cluster (auto mode admits them
    all). Cut off from the founders they elect nobody; the founders keep their coordinator."""
    with silenced_logs():
        sim = Sim(5)
        sim.bootstrap(3)
        sim.converge(200)
        minted = {sim.add_node() for _ in range(10)}
        sim.converge(400)
        leader = next(n.election for n in sim.nodes.values() if n.election.is_coordinator)
        assert set(leader.voters) == {"n0", "n1", "n2"}
        assert minted <= set(leader.members)
        sim.partition([{"n0", "n1", "n2"}, minted])
        sim.run(300)
    coordinators = [n.id for n in sim.nodes.values() if n.election.is_coordinator]
    assert coordinators and not set(coordinators) & minted, coordinators


def test_a_freed_seat_goes_to_the_most_senior_live_member() -> None:
    with silenced_logs():
        sim = Sim(2, ElectionConfig(remove_dead_ticks=10))
        sim.bootstrap(3)
        sim.converge(200)
        first = sim.add_node()
        sim.converge(200)
        second = sim.add_node()
        sim.converge(200)
        leader = next(n.id for n in sim.nodes.values() if n.election.is_coordinator)
        assert sim.nodes[leader].election.members[-2:] == (first, second)
        victim = next(v for v in ("n0", "n1", "n2") if v != leader)
        sim.crash(victim)
        sim.run(100)
        voters = set(sim.nodes[leader].election.voters)
    assert voters == {"n0", "n1", "n2"} - {victim} | {first}, voters


def test_a_voter_cap_is_configurable() -> None:
    e = Election(A, MemoryStorage(), random.Random(0), ElectionConfig(max_voters=1))
    e.bootstrap((A,))
    while not e.is_coordinator:
        e.tick()
    e.step(m.JoinRequest(ROGUE))
    assert e.log[-1].voters == (A,) and e.log[-1].members == (A, ROGUE)


# ---- the admission modes -------------------------------------------------------------------


def test_auto_mode_admits_any_key_and_logs_it() -> None:
    e = coordinator()
    with capture_logs() as logs:
        e.step(m.JoinRequest(ROGUE))
    assert e.log[-1].members == (A, B, C, ROGUE) and e.log[-1].voters == (A, B, C)  # no seat free
    assert any(x["event"] == "election.admitting" and x["key"] == ROGUE for x in logs)


def test_ask_mode_admits_only_after_approval() -> None:
    e = coordinator(Admission(Mode.ASK))
    before = len(e.log)
    for _ in range(3):
        e.step(m.JoinRequest(ROGUE))
    assert len(e.log) == before and e.pending() == (ROGUE,)
    assert e.admission.resolve(ROGUE[:4]) == ROGUE
    e.approve(ROGUE)
    assert e.log[-1].members == (A, B, C, ROGUE)
    e.step(m.AppendResponse(e.term, B, True, e.last_index))
    assert ROGUE in e.members and e.pending() == ()


def test_a_follower_in_ask_mode_lists_the_pending_key() -> None:
    e = follower_of_b(admission=Admission(Mode.ASK))
    e.step(m.JoinRequest(ROGUE))
    assert e.pending() == (ROGUE,) and len(e.log) == 2


def test_ask_mode_keeps_a_bounded_table_of_pending_keys() -> None:
    admission = Admission(Mode.ASK, capacity=16)
    keys = [f"{i:016x}" for i in range(40)]
    for key in keys:
        assert admission.consider(key) is Verdict.PENDING
    assert admission.pending() == tuple(keys[-16:])  # the oldest dropped
    admission.consider(keys[-16])  # asking again makes it the newest
    assert admission.pending()[-1] == keys[-16]
    with pytest.raises(AdmissionError, match="matches"):
        admission.resolve("00000000000000")
    with pytest.raises(AdmissionError, match="no pending"):
        admission.resolve("ffff")


def test_pinned_mode_admits_only_the_pinned_keys() -> None:
    friend = "0123456789abcdef"
    e = coordinator(Admission(Mode.PINNED, pinned=[friend]))
    before = len(e.log)
    e.step(m.JoinRequest(ROGUE))
    assert len(e.log) == before
    e.step(m.JoinRequest(friend))
    assert e.log[-1].members == (A, B, C, friend)
    with pytest.raises(AdmissionError, match="node id"):
        Admission(Mode.PINNED, pinned=["0123"])  # a short prefix could be ground out


# ---- a lagging member ----------------------------------------------------------------------


def test_a_lagging_member_follows_a_new_coordinator_once_a_known_voter_vouches() -> None:
    """`a` was away while x was admitted and promoted, and became coordinator of term 7."""
    x = "0123456789abcdef"
    e = follower_of_b()
    out = e.step(m.Append(7, x, 4, 5, (), 4))
    assert e.leader == B and e.term == 3
    asked = sorted(to for to, msg in out if isinstance(msg, m.VouchRequest) and msg.about == x and msg.term == 7)
    assert asked == [B, C]
    e.step(m.Vouched(ROGUE, x, 7))  # not a voter we know: no weight
    e.step(m.Vouched(C, x, 6))  # not what we asked
    assert e.step(m.Append(7, x, 2, 3, (), 2)) == [] and e.leader == B
    e.step(m.Vouched(C, x, 7))
    out = e.step(m.Append(7, x, 2, 3, (m.Entry(5, (A, B, C), (A, B, C, x)), m.Entry(6, (A, B, x), (A, B, C, x))), 4))
    assert e.leader == x and e.term == 7
    assert any(isinstance(msg, m.AppendResponse) and msg.success for _, msg in out)
    # Now x is a voter in a's own log: no vouching needed in the next term.
    e.step(m.Append(8, x, 4, 6, (), 4))
    assert e.leader == x and e.term == 8


def test_a_voter_vouches_only_for_its_own_coordinator() -> None:
    e = follower_of_b(C)
    assert e.step(m.VouchRequest(A, ROGUE, 3)) == []
    assert e.step(m.VouchRequest(A, B, 2)) == []
    assert e.step(m.VouchRequest(A, B, 3)) == [(A, m.Vouched(C, B, 3))]


def test_an_unknown_key_cannot_make_us_spray_vouch_requests() -> None:
    e = follower_of_b()
    sent = []
    for term in range(4, 40):
        sent += e.step(m.Append(term, ROGUE, 0, 0, (), 0))
    assert len(sent) <= 2  # one round (to b and c) per tick


# ---- the replicated config on the wire and on disk ---------------------------------------


def test_config_entries_carry_members_on_the_wire_and_on_disk() -> None:
    entry = m.Entry(4, (A, B), (B, A, C))
    append = m.Append(4, A, 0, 0, (entry, m.Entry(4)), 0)
    assert from_wire(to_wire(append)) == append
    state = HardState(4, A, 1, (entry,))
    assert decode_state(encode_state(state)) == state


def test_state_saved_before_members_still_loads() -> None:
    old = {"version": 1, "term": 2, "voted_for": None, "commit": 1, "log": [[0, ["a", "b"]], [2, None]]}
    state = decode_state(json.dumps(old).encode())
    assert state.log[0].members == ("a", "b") and state.log[1].members is None


def test_implausible_configurations_are_refused() -> None:
    too_many = tuple(f"{i:016x}" for i in range(MAX_MEMBERS + 1))
    for entry in (m.Entry(1, (A, ROGUE), (A,)), m.Entry(1, too_many[:1], too_many), m.Entry(1, (A,), (A, A)),
                  m.Entry(1, (), (A,))):
        with pytest.raises(ImplausibleMessage):
            check_message(m.Append(1, B, 0, 0, (entry,), 0), local_term=1)
    check_message(m.Append(1, B, 0, 0, (m.Entry(1, (A,), too_many[:MAX_MEMBERS - 1] + (A,)),), 0), local_term=1)


def test_only_admitted_members_get_stages() -> None:
    """A key that heartbeats (pending, or refused) is listed but never handed layers."""
    from types import SimpleNamespace

    from mesh.cluster.service import Member
    from mesh.node import Node

    members = [Member(A, free_memory=1 << 30, backend="torch", member=True),
               Member(ROGUE, free_memory=1 << 40, backend="torch", member=False)]
    fake = SimpleNamespace(cluster=SimpleNamespace(members=lambda: members))
    assert [c.node_id for c in Node._capacities(fake)] == [A]  # type: ignore[arg-type]
