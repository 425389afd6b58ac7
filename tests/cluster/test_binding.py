"""Every cluster message is bound to its authenticated sender (issue 17, part 1).

A rogue: a fresh key pair that holds the cluster secret but speaks for other nodes.
Each test is one of the attacks the security review demonstrated; the forged message
is refused, logged with the peer id (`cluster.forged_message`) and counted.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from actors import ActorSystem, MemoryNetwork, NodeIdentity

from mesh.cluster import messages as m
from mesh.cluster.service import ACTOR_NAME, ClusterService
from mesh.cluster.wire import Heartbeat, to_wire
from test_service import SECRET, agreed, memory_cluster, shutdown
from waiting import settle, until


async def rogue_on(net: MemoryNetwork, target: str = "h0:7000") -> tuple[ActorSystem, str]:
    rogue = ActorSystem(NodeIdentity.generate(), SECRET, net.transport("rogue"),
                        heartbeat_interval=0.2, heartbeat_timeout=1.0, backoff=(0.05, 0.5))
    await rogue.start("rogue", 7000)
    host, port = target.split(":")
    await rogue.connect(host, int(port))
    return rogue, rogue.node_id


@contextlib.asynccontextmanager
async def formed_with_rogue(target: str) -> AsyncIterator[tuple[ClusterService, ClusterService, ActorSystem]]:
    """A formed 3-node memory cluster, its leader, and a rogue linked to the leader or
    (``target="follower"``) to a follower: yields (leader, the rogue's peer or a follower, rogue)."""
    net = MemoryNetwork()
    services = await memory_cluster(3, net)
    rogue = None
    try:
        await until(lambda: agreed(services, 3), 10, "3 nodes to form")
        leader = next(s for s in services if s.is_coordinator)
        other = next(s for s in services if s is not leader)
        peer = leader if target == "leader" else other
        rogue, _ = await rogue_on(net, f"{peer.system.address[0]}:{peer.system.address[1]}")
        yield leader, other, rogue
    finally:
        if rogue is not None:
            await rogue.stop()
        await shutdown(services)


def member(service: ClusterService, node_id: str):
    return next(x for x in service.members() if x.node_id == node_id)


async def test_forged_heartbeat_naming_another_node_does_not_rewrite_its_address() -> None:
    async with formed_with_rogue("leader") as (leader, victim, rogue):
        before = member(leader, victim.node_id)
        forged = Heartbeat(victim.node_id, "evil", "10.6.6.6", 6666, free_memory=1 << 50, speed=1e9, api_port=6667)
        for _ in range(5):
            rogue.ref(leader.node_id, ACTOR_NAME).tell(forged)
        await until(lambda: leader.forged.get("Heartbeat", 0) >= 5, 5, "the forged heartbeats refused")
        after = member(leader, victim.node_id)
        assert after.address == before.address and after.address != ("10.6.6.6", 6666)
        assert after.api_port != 6667 and after.speed != 1e9


async def test_forged_leave_request_does_not_remove_a_voter() -> None:
    async with formed_with_rogue("leader") as (leader, victim, rogue):
        rogue.ref(leader.node_id, ACTOR_NAME).tell(to_wire(m.LeaveRequest(victim.node_id)))
        await until(lambda: leader.forged.get("leave", 0) >= 1, 5, "the forged leave refused")
        await settle(200)
        assert victim.node_id in leader.election.voters and len(leader.election.voters) == 3


@pytest.mark.parametrize("kind", ["vote", "append"])
async def test_forged_raft_src_is_refused(kind: str) -> None:
    async with formed_with_rogue("follower") as (leader, follower, rogue):
        term = follower.term
        msg = (m.VoteRequest(term + 5, leader.node_id, 10**6, term + 4, False) if kind == "vote"
               else m.Append(term + 5, leader.node_id, 0, 0, (), 0))
        rogue.ref(follower.node_id, ACTOR_NAME).tell(to_wire(msg))
        await until(lambda: follower.forged.get(kind, 0) >= 1, 5, "the forged raft message refused")
        assert follower.term < term + 5
