"""Attacks by one crafted Raft message (issue 17): none of them may break an election.

- An Append with term 2**64-1 used to be adopted and persisted: the next campaign could not
  be encoded, so no election ever happened again, not even after a restart.
- An Append that overwrites a committed entry tripped an `assert` in the election: after 3
  restarts the cluster actor was gone, while heartbeats kept the node "alive".

The attacker is a fresh key pair that holds the cluster secret (an insider), on the same
in-memory network as a real 2-node cluster.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from actors import ActorSystem, MemoryNetwork, NodeIdentity
from structlog.testing import capture_logs

from mesh.cluster import messages as m
from mesh.cluster.bounds import MAX_TERM, MAX_TERM_STEP, ImplausibleMessage, check_message
from mesh.cluster.election import Election, ElectionConfig
from mesh.cluster.fence import Fence
from mesh.cluster.persistence import FileStorage, MemoryStorage
from mesh.cluster.service import ACTOR_NAME, ClusterService, LocalFacts
from mesh.cluster.wire import RaftWire
from waiting import until

SECRET = b"test-cluster-secret"
HUGE = 2**64 - 1


async def start_cluster(net: MemoryNetwork, dirs: list[Path]) -> list[ClusterService]:
    services = []
    for i, state in enumerate(dirs):
        system = ActorSystem(NodeIdentity.load_or_create(state), SECRET, net.transport(f"h{i}"),
                             heartbeat_interval=0.2, heartbeat_timeout=1.0, backoff=(0.05, 0.5))
        await system.start(f"h{i}", 7000)
        peers = [f"h{j}:7000" for j in range(len(dirs)) if j != i]
        services.append(ClusterService(system, state_dir=state, static_peers=peers,
                                       facts=LocalFacts(name=f"node{i}"), bootstrap_after=0.5, seed=i))
    for s in services:
        await s.start()
    return services


async def stop_cluster(services: list[ClusterService]) -> None:
    for s in services:
        await s.stop()
        await s.system.stop()


def formed(services: list[ClusterService]) -> bool:
    coords = {s.coordinator for s in services}
    return len(coords) == 1 and None not in coords and all(len(s.election.voters) == len(services) for s in services)


async def rogue(net: MemoryNetwork, victim: str) -> ActorSystem:
    system = ActorSystem(NodeIdentity.generate(), SECRET, net.transport("rogue"), reconnect=False)
    await system.start("rogue", 7000)
    await system.connect(victim, 7000)
    return system


# ---- the bounds themselves ----------------------------------------------------------------


def test_append_with_term_2_64_is_implausible() -> None:
    with pytest.raises(ImplausibleMessage, match="term"):
        check_message(m.Append(HUGE, "rogue", 0, 0, (), 0), local_term=3)
    with pytest.raises(ImplausibleMessage, match="jumps"):
        check_message(m.VoteRequest(3 + MAX_TERM_STEP + 1, "rogue", 0, 0), local_term=3)
    with pytest.raises(ImplausibleMessage):
        check_message(m.Append(MAX_TERM + 1, "rogue", 0, 0, (), 0), local_term=MAX_TERM)
    with pytest.raises(ImplausibleMessage, match="sender"):
        check_message(m.VoteRequest(4, "me", 0, 0), local_term=3, self_id="me")
    with pytest.raises(ImplausibleMessage, match="entry term"):
        check_message(m.Append(4, "rogue", 0, 0, (m.Entry(5),), 0), local_term=3)
    with pytest.raises(ImplausibleMessage, match="int"):
        check_message(m.AppendResponse(4, "rogue", True, True), local_term=3)  # type: ignore[arg-type]
    # What an honest peer sends passes.
    check_message(m.Append(4, "peer", 2, 3, (m.Entry(4, ("a", "b")),), 2), local_term=3, self_id="me")
    check_message(m.VoteRequest(3 + MAX_TERM_STEP, "peer", 5, 3, pre=True), local_term=3)


def test_fence_refuses_an_implausible_term_and_keeps_its_own() -> None:
    raised: list[int] = []
    fence = Fence(7, "me", on_raise=raised.append)
    assert not fence.check(HUGE, src="rogue", command="PlanUpdate")
    assert not fence.check(7 + MAX_TERM_STEP + 1, src="rogue", command="PlanUpdate")
    assert fence.highest == 7 and raised == [] and fence.rejected == 2
    assert fence.check(8)
    assert fence.highest == 8 and raised == [8]


def test_plan_state_refuses_an_implausible_version() -> None:
    from mesh.pipeline.messages import PlanReady, PlanUpdate
    from mesh.pipeline.plan import Offer, PlanState

    plan = PlanState(Fence(1))
    assert plan.offer(PlanUpdate(1, 10**9, "rogue", "m", [])) is Offer.REFUSED
    assert plan.offer(PlanUpdate(1, 5, "coord", "m", [])) is Offer.NEW
    assert plan.offer(PlanUpdate(1, 5 + 2**16 + 1, "rogue", "m", [])) is Offer.REFUSED
    assert not plan.mark_ready(PlanReady(1, HUGE))  # type: ignore[call-arg]
    assert plan.epoch.version == 5 and plan.fence.highest == 1


def test_crafted_append_overwriting_a_committed_entry_is_refused_not_asserted() -> None:
    election = Election("me", MemoryStorage(), random.Random(0))
    election.bootstrap(("me", "peer"))
    assert election.commit == 1
    # Sent by a voter (a non-member's Append is not even read: see test_admission.py).
    out = election.step(m.Append(election.term, "peer", 0, 0, (m.Entry(election.term + 1, ("peer",)),), 1))
    out += election.step(m.Append(election.term + 1, "peer", 0, 0, (m.Entry(election.term + 1, ("peer",)),), 1))
    assert election.log[0].voters == ("me", "peer") and election.voters == ("me", "peer")
    assert out and all(isinstance(msg, m.AppendResponse) and not msg.success for _, msg in out)


def test_a_message_naming_ourselves_as_sender_is_dropped() -> None:
    election = Election("me", MemoryStorage(), random.Random(0))
    election.bootstrap(("me",))
    assert election.step(m.VoteRequest(election.term + 1, "me", 9, 0)) == []


def test_implausible_match_from_a_follower_does_not_commit_or_crash() -> None:
    election = Election("a", MemoryStorage(), random.Random(0), ElectionConfig(pre_vote=False))
    election.bootstrap(("a", "b", "c"))
    for _ in range(200):
        election.tick()
        if election.role.value == "candidate":
            break
    election.step(m.VoteResponse(election.term, "b", True))
    assert election.is_coordinator
    before = election.commit
    election.step(m.AppendResponse(election.term, "b", True, 10**6))
    election.step(m.AppendResponse(election.term, "b", False, 0, 10**6))
    assert election.commit == before


# ---- over the actor runtime ----------------------------------------------------------------


async def test_append_with_term_2_64_is_refused_not_persisted_and_elections_survive_restart(tmp_path: Path) -> None:
    net = MemoryNetwork()
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    services = await start_cluster(net, dirs)
    attacker = None
    try:
        await until(lambda: formed(services), 10, "2 nodes to form")
        victim = services[0]
        attacker = await rogue(net, "h0")
        with capture_logs() as logs:
            attacker.ref(victim.node_id, ACTOR_NAME).tell(
                RaftWire("append", attacker.node_id, HUGE, 0, 0, 0, entries=[]))
            await until(lambda: any(e["event"] == "cluster.implausible_message" for e in logs), 5,
                        "the Append refused")
        assert victim.term < MAX_TERM and victim.fence.highest < MAX_TERM
        assert FileStorage(dirs[0]).load().term < MAX_TERM
        first_term = max(s.term for s in services)
    finally:
        if attacker is not None:
            await attacker.stop()
        await stop_cluster(services)

    # After a restart from the same state dirs, the two nodes elect again, in a later term.
    net = MemoryNetwork()
    services = await start_cluster(net, dirs)
    try:
        await until(lambda: formed(services) and min(s.term for s in services) > first_term, 10,
                    "an election after the restart")
    finally:
        await stop_cluster(services)


async def test_crafted_append_no_longer_kills_the_cluster_actor() -> None:
    net = MemoryNetwork()
    services = await start_cluster_memory(net)
    attacker = None
    try:
        await until(lambda: formed(services), 10, "2 nodes to form")
        victim = next(s for s in services if not s.is_coordinator)
        attacker = await rogue(net, f"h{services.index(victim)}")
        with capture_logs() as logs:
            # More than the supervisor's 3 restarts: each used to trip the assert.
            for _ in range(5):
                term = victim.term
                attacker.ref(victim.node_id, ACTOR_NAME).tell(
                    RaftWire("append", attacker.node_id, term, 0, 0, 0, entries=[[term, [attacker.node_id]]]))
            # The rogue is no member: its Appends are refused before the log is touched.
            await until(lambda: sum(e["event"] == "election.not_a_member_refused" for e in logs) >= 5, 5,
                        "5 crafted Appends refused")
        # The actor is alive (a dead one raises on a local tell) and the voters are intact.
        victim.system.ref(victim.node_id, ACTOR_NAME).tell(object())
        assert set(victim.election.voters) == {s.node_id for s in services}
        # It still follows the real coordinator (the forged Appends named the rogue as leader).
        await until(lambda: formed(services), 10, "the cluster agrees again")
    finally:
        if attacker is not None:
            await attacker.stop()
        await stop_cluster(services)


async def start_cluster_memory(net: MemoryNetwork) -> list[ClusterService]:
    services = []
    for i in range(2):
        system = ActorSystem(NodeIdentity.generate(), SECRET, net.transport(f"h{i}"),
                             heartbeat_interval=0.2, heartbeat_timeout=1.0, backoff=(0.05, 0.5))
        await system.start(f"h{i}", 7000)
        services.append(ClusterService(system, static_peers=[f"h{1 - i}:7000"], facts=LocalFacts(name=f"n{i}"),
                                       bootstrap_after=0.5, seed=i))
    for s in services:
        await s.start()
    return services
