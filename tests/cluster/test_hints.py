"""A flood of mDNS hints (issue 17): bounded memory, bounded dials, and a real peer still found.

mDNS records are not authenticated. The hint table used to grow without bound and every
hint dialed an attacker-chosen address at once; discovery resolved every announced name.
"""

from __future__ import annotations

import asyncio

from actors import ActorSystem, MemoryNetwork, NodeIdentity
from zeroconf import ServiceStateChange

from mesh.cluster.discovery import MAX_RESOLVING, MdnsDiscovery, PeerHint
from mesh.cluster.hints import HintTable
from mesh.cluster.service import ClusterService, LocalFacts
from waiting import settle, until


def junk(i: int) -> PeerHint:
    return PeerHint(f"fake{i}", f"10.66.{i // 250}.{i % 250}", 7946)


def test_the_table_keeps_at_most_max_addresses() -> None:
    table = HintTable(max_addresses=256)
    for i in range(10_000):
        table.offer(junk(i))
    assert len(table) == 256 and table.stats.evicted == 10_000 - 256
    # The latest are kept (a real peer that re-announces comes back in), newest dialed first.
    assert [h.node_id for h in table.due(0.0)] == [f"fake{i}" for i in range(9_999, 9_991, -1)]


def test_at_most_max_in_flight_dials_at_once() -> None:
    table = HintTable(max_in_flight=8, rate=1000.0, burst=1000)
    for i in range(100):
        table.offer(junk(i))
    first = table.due(0.0)
    assert len(first) == 8 and table.due(0.1) == []
    table.finished(first[0])
    assert len(table.due(0.2)) == 1


def test_dials_are_rate_limited_by_a_token_bucket() -> None:
    table = HintTable(max_in_flight=1000, rate=4.0, burst=8)
    for i in range(1000):
        table.offer(junk(i))
    started = table.due(0.0)
    assert len(started) == 8  # the burst
    for t in range(1, 11):  # then 4 per second
        started += table.due(float(t))
    assert len(started) == 8 + 4 * 10


def test_one_address_is_dialed_at_most_once_per_interval_and_only_when_offered_again() -> None:
    table = HintTable(per_address_s=5.0)
    hint = junk(1)
    table.offer(hint)
    assert table.due(0.0) == [hint]
    table.finished(hint)
    assert table.due(1.0) == []  # not offered again
    table.offer(hint)
    assert table.due(2.0) == []  # offered, but within 5 s of its last dial
    assert table.due(5.0) == [hint]
    table.finished(hint)
    assert table.due(20.0) == []


def test_a_hint_that_waited_for_a_slot_is_dialed_later_not_lost() -> None:
    table = HintTable(max_in_flight=1, rate=1000.0, burst=1000)
    a, b = junk(1), junk(2)
    table.offer(a)
    table.offer(b)
    assert table.due(0.0) == [b]  # the newest first
    table.finished(b)
    assert table.due(0.1) == [a]


def test_known_nodes_are_dialed_before_a_flood_of_newer_hints() -> None:
    table = HintTable(burst=2)
    member = PeerHint("member", "10.0.0.2", 7946)
    table.offer(member)
    for i in range(100):
        table.offer(junk(i))
    assert table.due(0.0, known={"member"})[0] == member


def test_hints_of_connected_nodes_are_not_dialed() -> None:
    table = HintTable()
    table.offer(junk(1))
    assert table.due(0.0, connected={"fake1"}) == []


async def test_a_flood_of_hints_makes_the_service_dial_a_bounded_number() -> None:
    """2000 hints at once: the cluster service starts at most `burst` dials, and a real
    peer's hint among them is still dialed and connected (later, on a tick)."""
    net = MemoryNetwork()
    a = ActorSystem(NodeIdentity.generate(), b"s" * 32, net.transport("a"), reconnect=False)
    b = ActorSystem(NodeIdentity.generate(), b"s" * 32, net.transport("b"), reconnect=False)
    await a.start("a", 1)
    await b.start("b", 1)
    service = ClusterService(a, facts=LocalFacts(name="a"), bootstrap_after=60)
    dials: list[str] = []
    real_connect = a.connect

    async def counting_connect(host: str, port: int) -> str:
        dials.append(host)
        return await real_connect(host, port)

    a.connect = counting_connect  # type: ignore[method-assign]
    await service.start()
    try:
        for i in range(2000):
            service.add_hint(PeerHint(f"fake{i}", f"nowhere{i}", 9))
        service.add_hint(PeerHint(b.node_id, "b", 1))
        await settle()
        assert len(dials) <= service.hints.burst
        assert len(service.hints) <= service.hints.max_addresses
        await until(lambda: b.node_id in a.peers(), 10, "the real peer to be dialed")
        assert len(dials) < 100
    finally:
        await service.stop()
        await a.stop()
        await b.stop()


async def test_discovery_resolves_at_most_max_resolving_records_at_once() -> None:
    disc = MdnsDiscovery("me", 1, b"s", ["127.0.0.1"], lambda hint: None)
    started = asyncio.Event()
    resolving: list[str] = []

    async def slow_resolve(service_type: str, name: str) -> None:
        resolving.append(name)
        await started.wait()

    disc._resolve = slow_resolve  # type: ignore[method-assign]
    for i in range(500):
        disc._on_change(None, "_mesh._tcp.local.", f"n{i}._mesh._tcp.local.", ServiceStateChange.Added)  # type: ignore[arg-type]
    disc._on_change(None, "_mesh._tcp.local.", "n0._mesh._tcp.local.", ServiceStateChange.Updated)  # type: ignore[arg-type]
    await settle()
    assert len(resolving) == MAX_RESOLVING and disc.resolves_dropped == 500 - MAX_RESOLVING + 1
    started.set()
    await until(lambda: not disc._tasks, 5, "the resolves to end")
    disc._on_change(None, "_mesh._tcp.local.", "late._mesh._tcp.local.", ServiceStateChange.Added)  # type: ignore[arg-type]
    await settle()
    assert resolving[-1] == "late._mesh._tcp.local."
