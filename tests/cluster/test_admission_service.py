"""`mesh admit` end to end, without a model: ClusterServices on the memory transport in
`--admit ask` mode, and the real HTTP API and `mesh admit` client of one member.

A key that proves the secret waits; a member's approval, posted to its own API, is
forwarded over the authenticated link to the coordinator, which admits it.
"""

from __future__ import annotations

import pytest
from actors import ActorSystem, MemoryNetwork, NodeIdentity
from actors.errors import ActorsError

from mesh.cluster.admission import Admission, Mode
from mesh.cluster.service import ACTOR_NAME, ClusterService, LocalFacts
from mesh.cluster.wire import AdmitRequest
from mesh.commands.admit import post_admit
from mesh.http.app import Api
from waiting import until

SECRET = b"test-cluster-secret"


class ClusterOnly:
    """The slice of a Node the admit route and the cluster view use."""

    model_name = "none"

    def __init__(self, service: ClusterService) -> None:
        self.service = service

    async def admit(self, prefix: str) -> str:
        return await self.service.admit(prefix)

    def status(self) -> dict:
        return {"pending": list(self.service.pending())}


async def start(net: MemoryNetwork, i: int, n: int) -> ClusterService:
    """Node i of n; node 0 founds, the later ones wait long enough to hear it first (never found)."""
    system = ActorSystem(NodeIdentity.generate(), SECRET, net.transport(f"h{i}"),
                         heartbeat_interval=0.2, heartbeat_timeout=1.0, backoff=(0.05, 0.5))
    await system.start(f"h{i}", 7000)
    service = ClusterService(system, static_peers=[f"h{j}:7000" for j in range(n) if j != i],
                             facts=LocalFacts(name=f"n{i}", backend="torch"), bootstrap_after=0.2 if i == 0 else 5.0, seed=i,
                             admission=Admission(Mode.ASK))
    await service.start()
    return service


async def test_ask_mode_admits_a_key_approved_with_mesh_admit_on_another_member() -> None:
    net = MemoryNetwork()
    services = [await start(net, 0, 3)]
    api = None
    try:
        await until(lambda: services[0].is_coordinator, 10, "a founder")
        services.append(await start(net, 1, 3))
        founder = next(s for s in services if s.is_coordinator)
        second = next(s for s in services if s is not founder)
        await until(lambda: second.node_id in founder.pending(), 10, "the second key to wait")
        assert not second.election.is_member
        assert not next(m for m in founder.members() if m.node_id == second.node_id).member  # no stages for it
        await founder.admit(second.node_id[:6])
        await until(lambda: second.election.is_member and second.node_id in founder.election.members, 10,
                    "the second key admitted")

        third = await start(net, 2, 3)
        services.append(third)
        await until(lambda: third.node_id in second.pending(), 10, "the third key listed on the other member")
        assert third.node_id not in founder.election.members
        # A key that is no member cannot approve itself (nor anyone) over its own link.
        with pytest.raises(ActorsError, match="not a member"):
            await third.system.ref(founder.node_id, ACTOR_NAME).ask(AdmitRequest(third.node_id), timeout=2)
        assert third.node_id not in founder.election.members
        api = Api(ClusterOnly(second), hosts=["127.0.0.1"])
        await api.start("127.0.0.1", 0)
        url = f"http://127.0.0.1:{api.port}"
        assert await post_admit(url, third.node_id[:5]) == third.node_id  # forwarded to the coordinator
        await until(lambda: all(third.node_id in s.election.members for s in services), 10, "the third admitted")
        assert next(m for m in founder.members() if m.node_id == third.node_id).member
    finally:
        if api is not None:
            await api.stop()
        for s in services:
            await s.stop()
            await s.system.stop()


async def test_a_fresh_key_cannot_make_itself_coordinator_over_the_runtime() -> None:
    """The election hole over real links: a rogue key with the secret sends a higher-term
    Append (and a vote request) in its own name to a follower. The follower keeps its
    coordinator, so mesh/binding.py never takes the rogue's PlanUpdates as the coordinator's."""
    from structlog.testing import capture_logs

    from mesh.cluster.wire import RaftWire

    net = MemoryNetwork()
    services = [await start(net, 0, 2)]
    rogue = None
    try:
        await until(lambda: services[0].is_coordinator, 10, "a founder")
        services.append(await start(net, 1, 2))
        founder = next(s for s in services if s.is_coordinator)
        second = next(s for s in services if s is not founder)
        await founder.admit(second.node_id)
        await until(lambda: second.coordinator == founder.node_id and second.election.is_member, 10, "2 members")
        rogue = ActorSystem(NodeIdentity.generate(), SECRET, net.transport("rogue"), reconnect=False)
        await rogue.start("rogue", 7000)
        await rogue.connect(f"h{services.index(second)}", 7000)
        term = second.term
        with capture_logs() as logs:
            ref = rogue.ref(second.node_id, ACTOR_NAME)
            ref.tell(RaftWire("append", rogue.node_id, term + 1, 0, 0, 0, entries=[]))
            ref.tell(RaftWire("vote", rogue.node_id, term + 2, 99, term + 1))
            await until(lambda: sum(e["event"] == "election.not_a_member_refused" for e in logs) >= 2, 10,
                        "both refused")
        assert second.coordinator == founder.node_id and second.term == term
        assert all(e.get("peer") == rogue.node_id for e in logs if e["event"] == "election.not_a_member_refused")
    finally:
        if rogue is not None:
            await rogue.stop()
        for s in services:
            await s.stop()
            await s.system.stop()
