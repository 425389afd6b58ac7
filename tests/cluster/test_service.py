"""ClusterService over the actor runtime: in-memory transport (many nodes, one process) and real TCP."""

from __future__ import annotations

import asyncio
import time

import pytest
from actors import ActorSystem, MemoryNetwork, NodeIdentity

from mesh.cluster.service import ClusterEvent, ClusterService, LocalFacts
from waiting import until

SECRET = b"test-cluster-secret"


def agreed(services: list[ClusterService], n_voters: int) -> str | None:
    """The coordinator if all services agree on it and on a configuration of n_voters."""
    coords = {s.coordinator for s in services}
    terms = {s.term for s in services}
    if len(coords) != 1 or len(terms) != 1 or None in coords:
        return None
    if any(len(s.election.voters) != n_voters for s in services):
        return None
    return coords.pop()


async def memory_cluster(n: int, net: MemoryNetwork) -> list[ClusterService]:
    services = []
    for i in range(n):
        system = ActorSystem(NodeIdentity.generate(), SECRET, net.transport(f"h{i}"),
                             heartbeat_interval=0.2, heartbeat_timeout=1.0, backoff=(0.05, 0.5))
        await system.start(f"h{i}", 7000)
        peers = [f"h{j}:7000" for j in range(n) if j != i]
        services.append(ClusterService(system, static_peers=peers, facts=LocalFacts(name=f"node{i}"),
                                       bootstrap_after=0.5, seed=i))
    for s in services:
        await s.start()
    return services


async def shutdown(services: list[ClusterService]) -> None:
    for s in services:
        await s.stop()
        await s.system.stop()


@pytest.mark.slow
async def test_memory_cluster_forms_fails_over_and_heals() -> None:
    net = MemoryNetwork()
    services = await memory_cluster(3, net)
    events: list[ClusterEvent] = []
    try:
        await until(lambda: agreed(services, 3), 10, "3 nodes to form")
        leader = next(s for s in services if s.is_coordinator)
        for s in services:
            s.on_change(events.append)
        first_term = leader.term
        members = {m.node_id: m for m in services[0].members()}
        assert len(members) == 3 and all(m.voter for m in members.values())
        assert members[leader.node_id].roles[0] == "coordinator"

        net.crash(f"h{services.index(leader)}")
        await leader.stop()
        rest = [s for s in services if s is not leader]
        await until(lambda: agreed(rest, 3) and rest[0].term > first_term, 10, "a new coordinator")
        await until(lambda: any(e.kind == "member" and e.node_id == leader.node_id and e.state == "dead"
                                   for e in events), 5, "the old coordinator declared dead")
        assert all(s.fence.highest == s.term for s in rest)
    finally:
        await shutdown(services)


@pytest.mark.slow
async def test_memory_partition_minority_loses_coordinator_and_heals() -> None:
    net = MemoryNetwork()
    services = await memory_cluster(3, net)
    try:
        await until(lambda: agreed(services, 3), 10, "3 nodes to form")
        leader = next(s for s in services if s.is_coordinator)
        lonely = f"h{services.index(leader)}"
        net.partition([lonely], [f"h{i}" for i in range(3) if f"h{i}" != lonely])
        rest = [s for s in services if s is not leader]
        await until(lambda: not leader.is_coordinator, 5, "the cut-off coordinator to step down")
        await until(lambda: agreed(rest, 3) and rest[0].term > leader.term - 1, 10, "majority side to elect")
        net.heal()
        await until(lambda: agreed(services, 3), 15, "the cluster to heal into one view")
    finally:
        await shutdown(services)


@pytest.mark.slow
async def test_graceful_leave_is_not_a_failure() -> None:
    net = MemoryNetwork()
    services = await memory_cluster(3, net)
    try:
        await until(lambda: agreed(services, 3), 10, "3 nodes to form")
        follower = next(s for s in services if not s.is_coordinator)
        assert await follower.leave()
        rest = [s for s in services if s is not follower]
        await until(lambda: agreed(rest, 2), 5, "a 2-voter configuration")
        await until(
            lambda: {m.node_id: m.state for m in rest[0].members()}.get(follower.node_id) == "left", 5, "left state"
        )
    finally:
        await shutdown(services)


@pytest.mark.slow
async def test_tcp_loopback_form_detect_and_reelect() -> None:
    """Real TCP on 127.0.0.1; prints the measured figures (pytest -s)."""
    systems = [ActorSystem(NodeIdentity.generate(), SECRET, heartbeat_interval=0.2, heartbeat_timeout=1.0,
                           backoff=(0.05, 0.5)) for _ in range(3)]
    addrs = [await s.start("127.0.0.1", 0) for s in systems]
    services = [
        ClusterService(sys_, static_peers=[f"{h}:{p}" for h, p in addrs if (h, p) != sys_.address],
                       bootstrap_after=0.5, seed=i)
        for i, sys_ in enumerate(systems)
    ]
    t0 = time.monotonic()
    for s in services:
        await s.start()
    try:
        formed = await until(lambda: agreed(services, 3), 15, "3 nodes to form over TCP")
        formed = time.monotonic() - t0
        leader = next(s for s in services if s.is_coordinator)
        rest = [s for s in services if s is not leader]
        old_term = leader.term
        killed = time.monotonic()
        await leader.stop()
        await leader.system.stop()  # a crash as the peers see it: heartbeats and the link stop
        detected = await until(
            lambda: all(
                next(m.state for m in s.members() if m.node_id == leader.node_id) == "dead" for s in rest
            ), 5, "the killed node to be declared dead")
        await until(lambda: agreed(rest, 3) and rest[0].term > old_term, 10, "a new coordinator")
        elected = time.monotonic() - killed
        print(f"\nTCP loopback: formed={formed:.2f}s detected_dead={detected:.2f}s new_coordinator={elected:.2f}s")
        assert detected < 2.0 and elected < 3.0
    finally:
        await shutdown(services)


@pytest.mark.slow
async def test_memory_four_nodes_remove_the_dead_and_survive_a_second_failure() -> None:
    net = MemoryNetwork()
    services = await memory_cluster(4, net)
    try:
        # 3 seats (the default): the last of the 4 to join is a member without a vote.
        await until(lambda: agreed(services, 3) and all(len(s.election.members) == 4 for s in services), 15,
                    "4 nodes to form")
        leader = next(s for s in services if s.is_coordinator)
        learner = next(s for s in services if not s.election.is_voter)
        victim = next(s for s in services if s is not leader and s is not learner)
        net.crash(f"h{services.index(victim)}")
        await victim.stop()
        rest = [s for s in services if s is not victim]
        # dead after ~1 s, removed after remove_dead_after (1 s) more; then the learner gets the seat
        took = await until(lambda: agreed(rest, 3) and all(learner.node_id in s.election.voters for s in rest), 6,
                           "the dead follower to be removed and its seat given to the learner")
        assert leader.is_coordinator, "removing a dead follower must not disturb the coordinator"
        net.crash(f"h{services.index(leader)}")
        await leader.stop()
        survivors = [s for s in rest if s is not leader]
        await until(lambda: agreed(survivors, 2), 10, "2 survivors of 4 to elect and remove the old coordinator")
        print(f"\nremoved the dead follower after {took:.2f}s")
    finally:
        await shutdown(services)


async def test_event_stream_survives_a_cancelled_wait() -> None:
    """node.py waits with `wait_for(events.__anext__(), 0.5)`: a timeout must not end the stream."""
    system = ActorSystem(NodeIdentity.generate(), SECRET, MemoryNetwork().transport("h0"))
    service = ClusterService(system)
    events = service.events().__aiter__()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(events.__anext__(), 0.05)
    service._emit(ClusterEvent("coordinator", "x", 3))
    assert await asyncio.wait_for(events.__anext__(), 1) == ClusterEvent("coordinator", "x", 3)
