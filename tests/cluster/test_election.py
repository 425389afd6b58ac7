"""Scripted interactions with the election machine (etcd-raft style), no network, no clock."""

from __future__ import annotations

import random

from cluster_sim import Sim
from mesh.cluster.election import Election, ElectionConfig, Role
from mesh.cluster.messages import Append, AppendResponse, VoteRequest, VoteResponse
from mesh.cluster.persistence import FileStorage, MemoryStorage


def node(node_id: str, voters: tuple[str, ...], storage: MemoryStorage | None = None) -> Election:
    e = Election(node_id, storage or MemoryStorage(), random.Random(0))
    e.bootstrap(voters)
    return e


def test_single_node_elects_itself() -> None:
    e = node("a", ("a",))
    for _ in range(20):
        e.tick()
    assert e.is_coordinator and e.term == 1 and e.commit == 2


def test_vote_is_persisted_before_it_is_granted() -> None:
    class Recorder(MemoryStorage):
        def save(self, state):  # type: ignore[no-untyped-def]
            super().save(state)
            events.append(("save", state.voted_for))

    events: list[tuple[str, str | None]] = []
    b = node("b", ("a", "b", "c"), Recorder())
    out = b.step(VoteRequest(1, "a", 1, 0))
    events.append(("send", None))
    assert out == [("a", VoteResponse(1, "b", True))]
    assert events.index(("save", "a")) < events.index(("send", None))


def test_one_vote_per_term_even_after_restart() -> None:
    storage = MemoryStorage()
    b = node("b", ("a", "b", "c"), storage)
    b.step(VoteRequest(1, "a", 1, 0))
    restarted = Election("b", storage, random.Random(1))
    assert restarted.step(VoteRequest(1, "c", 1, 0)) == [("c", VoteResponse(1, "b", False))]


def test_pre_vote_does_not_raise_terms() -> None:
    a = node("a", ("a", "b", "c"))
    for _ in range(30):
        out = a.tick()
        if any(isinstance(m, VoteRequest) for _, m in out):
            break
    assert a.role is Role.PRE_CANDIDATE and a.term == 0
    assert {m.term for _, m in out if isinstance(m, VoteRequest)} == {1}
    b = node("b", ("a", "b", "c"))
    b.step(VoteRequest(1, "a", 1, 0, pre=True))
    assert b.term == 0 and b.voted_for is None


def test_lease_ignores_votes_while_the_coordinator_is_alive() -> None:
    b = node("b", ("a", "b", "c"))
    b.step(Append(1, "a", 1, 0, (), 1))
    assert b.step(VoteRequest(2, "c", 5, 1)) == []
    assert b.term == 1


def test_stale_coordinator_is_fenced_and_told_the_new_term() -> None:
    b = node("b", ("a", "b", "c"))
    b.step(VoteRequest(3, "c", 1, 0))
    out = b.step(Append(2, "a", 1, 0, (), 1))
    assert out == [("a", AppendResponse(3, "b", False, 0, 1))]
    assert b.leader is None and b.term == 3


def test_coordinator_without_quorum_steps_down() -> None:
    sim = Sim(7)
    sim.bootstrap(3)
    sim.converge(200)
    leader = next(n for n in sim.nodes.values() if n.election.is_coordinator)
    sim.partition([{leader.id}, set(sim.nodes) - {leader.id}])
    sim.run(2 * ElectionConfig().election_ticks + 1)
    assert not leader.election.is_coordinator
    others = [n.election for n in sim.nodes.values() if n is not leader]
    assert any(e.is_coordinator and e.term > leader.election.term - 1 for e in others)


def test_two_nodes_without_the_other_have_no_coordinator() -> None:
    sim = Sim(3)
    sim.bootstrap(2)
    sim.converge(200)
    leader = next(n for n in sim.nodes.values() if n.election.is_coordinator)
    sim.crash(next(n for n in sim.nodes if n != leader.id))
    sim.run(200)
    assert not any(n.election.is_coordinator for n in sim.nodes.values() if n.up)


def test_join_and_leave_change_voters_one_at_a_time() -> None:
    sim = Sim(11)
    sim.bootstrap(3)
    sim.converge(200)
    newcomer = sim.add_node()
    sim.converge(200)
    # Three seats, all taken by the founders: the newcomer is a member without a vote.
    assert all(newcomer in n.election.members and newcomer not in n.election.voters for n in sim.nodes.values())
    leader = next(n for n in sim.nodes.values() if n.election.is_coordinator)
    sim._send(leader.id, leader.election.leave())
    sim.converge(200)
    sim.run(30)  # the seat it freed goes to the newcomer, one change after the removal
    assert all(leader.id not in n.election.voters for n in sim.nodes.values())
    assert all(newcomer in n.election.voters for n in sim.nodes.values())
    assert not leader.election.is_coordinator
    configs = [set(e.voters) for e in sim.committed if e.voters is not None]
    assert all(len(x ^ y) <= 1 for x, y in zip(configs, configs[1:]))


def test_file_storage_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    storage = FileStorage(tmp_path)
    e = node("a", ("a",), storage)  # type: ignore[arg-type]
    for _ in range(25):
        e.tick()
    again = FileStorage(tmp_path).load()
    assert (again.term, again.voted_for, again.commit, again.log) == (e.term, e.voted_for, e.commit, tuple(e.log))
    assert oct((tmp_path / "election.json").stat().st_mode & 0o777) == "0o600"


def test_corrupt_state_file_says_what_to_do(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from mesh.cluster.errors import CorruptClusterState

    (tmp_path / "election.json").write_text('{"version": 1, "term": "x"}')
    with pytest.raises(CorruptClusterState, match="move it away"):
        FileStorage(tmp_path).load()


def test_a_fenced_term_is_adopted_and_survives_a_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A command of a higher term than the election knows: the term is saved before it is applied."""
    from mesh.cluster.fence import Fence

    storage = FileStorage(tmp_path)
    e = node("a", ("a",), storage)  # type: ignore[arg-type]
    for _ in range(20):
        e.tick()
    assert e.is_coordinator and e.term == 1
    fence = Fence(e.term, "a", on_raise=lambda term: e.observe_term(term))
    assert fence.check(5, src="z", command="PlanUpdate")
    assert e.term == 5 and not e.is_coordinator, "a coordinator of term 5 exists: ours of term 1 steps down"
    restarted = Election("a", FileStorage(tmp_path), random.Random(1))
    assert not Fence(restarted.term, "a").check(4, src="old", command="PlanUpdate")


def test_set_dead_counts_only_while_dead_and_a_message_resets_it() -> None:
    e = node("a", ("a", "b", "c"))
    e.cfg = ElectionConfig(remove_dead_ticks=3)
    e.set_dead({"b"})
    e.tick()
    e.tick()
    assert e._dead_ticks == {"b": 2}
    e.step(VoteResponse(0, "b", False))
    assert e._dead_ticks == {"b": 0}
    e.set_dead(set())
    assert e._dead_ticks == {}


def test_a_last_voter_that_wants_to_leave_stays_coordinator() -> None:
    """Its own LeaveRequest must not reach itself as an Append: that made it a follower whose
    leader was itself, and as the only voter nobody could ever be elected again."""
    a = node("a", ("a",))
    for _ in range(20):
        a.tick()
    assert a.is_coordinator
    out = a.leave()
    for _ in range(50):
        out += a.tick()
    assert all(dst != "a" for dst, _ in out), out
    assert a.is_coordinator and a.leader == "a" and a.voters == ("a",) and a.term == 1


def test_founders_that_all_leave_hand_over_to_the_nodes_that_joined() -> None:
    """The hypothesis case (n=3, seed=0): two nodes join, then all three founders leave at once.
    The last founder must not stop campaigning: the joiners end up as the only voters."""
    sim = Sim(0)
    sim.bootstrap(3)
    joiners = {sim.add_node(), sim.add_node()}
    for founder in ("n0", "n1", "n2"):
        sim._send(founder, sim.nodes[founder].election.leave())
    sim.converge(300)
    coordinator = next(n.election for n in sim.nodes.values() if n.election.is_coordinator)
    assert coordinator.id in joiners and set(coordinator.voters) == joiners
    for n in sim.nodes.values():
        assert n.election.is_voter == (n.id in joiners)
        assert (n.election.leader == n.id) == n.election.is_coordinator


def test_a_leaving_coordinator_commits_its_own_removal() -> None:
    for seed in range(10):
        sim = Sim(seed)
        sim.bootstrap(3)
        sim.converge(200)
        leader = next(n for n in sim.nodes.values() if n.election.is_coordinator).election
        term = leader.term
        sim._send(leader.id, leader.leave())
        for _ in range(50):
            if not leader.is_voter:
                break
            assert leader.is_coordinator and leader.term == term, f"seed={seed}: stepped down before its removal"
            sim.tick()
        assert leader.voters == tuple(sorted(set(sim.nodes) - {leader.id}))
        assert not leader.is_coordinator and leader.leader != leader.id
        sim.converge(200)


def test_a_member_that_gave_up_its_vote_is_not_promoted_by_the_next_coordinator() -> None:
    """`leave()` asks the coordinator to take this node's vote, and the coordinator kept
    that wish in memory only: its successor saw a live learner and promoted it again
    (a vote the member never asked for, and one more voter to reach for a quorum)."""
    for seed in range(5):
        sim = Sim(seed, ElectionConfig(remove_dead_ticks=20))
        sim.bootstrap(3)
        sim.converge(200)
        learner = sim.add_node()  # seats full: a learner
        sim.converge(200)
        leader = next(n.id for n in sim.nodes.values() if n.election.is_coordinator)
        quitter = next(n for n in ("n0", "n1", "n2") if n != leader)
        sim._send(quitter, sim.nodes[quitter].election.leave())
        sim.converge(200)
        sim.run(30)  # its seat goes to the learner
        assert all(quitter not in n.election.voters and learner in n.election.voters
                   for n in sim.nodes.values()), f"seed={seed}"
        sim.crash(leader)  # a new coordinator, which removes the dead one and has a free seat
        for _ in range(400):
            sim.tick()
            for n in sim.nodes.values():
                if n.up and n.election.is_coordinator:
                    assert quitter not in n.election._latest_config()[0], (
                        f"seed={seed}: {n.id} (term {n.election.term}) gave {quitter} its vote back")
        new = next(n.election for n in sim.nodes.values() if n.up and n.election.is_coordinator)
        assert new.id != leader and leader not in new.voters, f"seed={seed}: the dead coordinator was not removed"
        assert not sim.nodes[quitter].election.is_voter
        sim._send(quitter, sim.nodes[quitter].election.join())  # it asks for its vote again: it gets it
        sim.run(60)
        assert quitter in new.voters, f"seed={seed}"


def test_no_vote_travels_with_every_append_response() -> None:
    from mesh.cluster.wire import from_wire, to_wire

    for no_vote in (False, True):
        resp = AppendResponse(4, "b", True, 7, 2, no_vote=no_vote)
        assert from_wire(to_wire(resp)) == resp
    b = node("b", ("a", "b"))
    b.leave()
    out = b.step(Append(1, "a", 1, 0, (), 1))
    assert [msg.no_vote for _, msg in out if isinstance(msg, AppendResponse)] == [True]


def test_a_member_dead_for_long_is_forgotten_and_may_join_again() -> None:
    """Members were never removed: keys of devices long gone (reinstalled, given away)
    filled the 64 member slots, and no new device could join. A coordinator removes a
    member dead for `forget_dead_ticks` (a voter first loses its vote, after
    `remove_dead_ticks`), one configuration change at a time through the log."""
    for seed in range(3):
        sim = Sim(seed, ElectionConfig(remove_dead_ticks=5, forget_dead_ticks=80))
        sim.bootstrap(3)
        sim.converge(200)
        learners = [sim.add_node(), sim.add_node()]
        sim.converge(200)
        leader = next(n.id for n in sim.nodes.values() if n.election.is_coordinator)
        voter = next(v for v in ("n0", "n1", "n2") if v != leader)
        sim.crash(learners[1])
        sim.crash(voter)
        sim.run(60)  # the voter lost its seat (to the live learner), both are still members
        coord = next(n.election for n in sim.nodes.values() if n.up and n.election.is_coordinator)
        assert voter not in coord.voters and learners[0] in coord.voters, f"seed={seed}"
        assert {voter, learners[1]} <= set(coord.members), f"seed={seed}: forgotten too early"
        sim.run(60)
        for n in sim.nodes.values():
            if n.up:
                assert voter not in n.election.members and learners[1] not in n.election.members, f"seed={seed}"
                assert set(n.election.voters) == {leader, learners[0], next(v for v in ("n0", "n1", "n2")
                                                                            if v not in (leader, voter))}
        configs = [(set(e.voters), set(e.members)) for e in sim.committed if e.voters is not None]
        assert all(len(a[0] ^ b[0]) + len(a[1] ^ b[1]) <= 1 for a, b in zip(configs, configs[1:])), "one change at a time"
        sim.restart(learners[1])  # it comes back: it asks to join again, and is admitted (auto)
        sim.run(80)
        assert learners[1] in coord.members and learners[1] not in coord.voters, f"seed={seed}"
