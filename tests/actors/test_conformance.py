"""One suite, both transports (TCP on loopback and the in-memory network)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pytest

from actors import Actor, ActorDead, AskTimeout, HandlerError, PeerUnreachable, Terminated, message

from waiting import until


@message("test.Work")
@dataclass
class Work:
    x: np.ndarray
    scale: float = 2.0


class Worker(Actor):
    async def receive(self, msg, ctx):
        if isinstance(msg, Work):
            return msg.x * msg.scale
        if msg == "boom":
            raise ValueError("boom")
        if msg == "slow":
            await asyncio.sleep(0.4)
        if msg == "whoami":
            return ctx.sender.path if ctx.sender else None
        return msg


class Relay(Actor):
    """Tells the target and records what comes back to it as the sender."""

    def __init__(self) -> None:
        self.got: list = []

    async def receive(self, msg, ctx):
        if isinstance(msg, tuple) or isinstance(msg, list) and msg and msg[0] == "go":
            ctx.system.ref(msg[1], msg[2]).tell("ping", sender=ctx.self_ref)
            return None
        self.got.append(msg)
        return None


class Pong(Actor):
    async def receive(self, msg, ctx):
        if ctx.sender is not None:
            ctx.sender.tell("pong")


async def test_local_and_remote_refs_behave_the_same(make_system) -> None:
    a, b = await make_system(), await make_system()
    a.spawn(Worker, name="w")
    peer = await b.connect(*a.address)
    for ref in (a.ref(a.node_id, "w"), b.ref(peer, "w")):
        out = await ref.ask(Work(np.arange(4, dtype=np.float32)), timeout=3)
        assert out.tolist() == [0, 2, 4, 6]
        assert await ref.ask({"k": [1, 2]}, timeout=3) == {"k": [1, 2]}
        with pytest.raises(HandlerError) as info:
            await ref.ask("boom", timeout=3)
        assert info.value.kind == "ValueError"
        with pytest.raises(AskTimeout):
            await ref.ask("slow", timeout=0.1)
        assert await ref.ask("after", timeout=3) == "after"  # restarted after boom, done with slow


async def test_replies_and_senders_cross_nodes(make_system) -> None:
    a, b = await make_system(), await make_system()
    relay = Relay()
    b.spawn(relay, name="relay")
    a.spawn(Pong, name="pong")
    await b.connect(*a.address)
    b.ref(b.node_id, "relay").tell(["go", a.node_id, "pong"])
    await until(lambda: relay.got, what="the pong")
    assert relay.got == ["pong"]


async def test_asks_to_unknown_or_dead_actors_fail_fast(make_system) -> None:
    a, b = await make_system(), await make_system()
    peer = await b.connect(*a.address)
    ref = a.spawn(Worker, name="w")
    await a.stop_actor(ref)
    for target in (a.ref(a.node_id, "nobody"), b.ref(peer, "nobody"), ref, b.ref(peer, "w")):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ActorDead):
            await target.ask("hi", timeout=5)
        assert loop.time() - t0 < 1.0
    with pytest.raises(PeerUnreachable):
        await b.ref("0123456789abcdef", "w").ask("hi", timeout=5)


async def test_peer_events_reconnect_and_remote_watch(make_system) -> None:
    a, b = await make_system(), await make_system(heartbeat_interval=0.1, heartbeat_timeout=0.5, backoff=(0.02, 0.1))
    events = []
    b.on_peer(events.append)
    a.spawn(Worker, name="w")
    peer = await b.connect(*a.address)
    terminated: list[Terminated] = []
    b.watch(b.ref(peer, "w"), terminated.append)
    await until(lambda: events, what="the up event")
    assert [(e.node_id, e.up) for e in events] == [(peer, True)]
    assert events[0].address == a.address
    await a.stop_actor(a.ref(a.node_id, "w"))
    await until(lambda: terminated, what="the remote Terminated")
    assert terminated[0].name == "w" and terminated[0].node_id == peer
    # the link drops: down event, then the dialer reconnects on its own
    b._links[peer].close("test cut", abort=True)
    await until(lambda: len(events) >= 3, what="down, then up again")
    assert [(e.node_id, e.up) for e in events] == [(peer, True), (peer, False), (peer, True)]
    a.spawn(Worker, name="w2")
    assert await b.ref(peer, "w2").ask(1, timeout=3) == 1


async def test_simultaneous_dials_leave_one_link(make_system) -> None:
    a, b = await make_system(), await make_system()
    await asyncio.gather(a.connect(*b.address), b.connect(*a.address))

    def one_link_each() -> bool:
        la, lb = a._links.get(b.node_id), b._links.get(a.node_id)
        return la is not None and lb is not None and la.dialer_id == lb.dialer_id
    await until(one_link_each, what="both sides keeping the same link")
    assert set(a.peers()) == {b.node_id} and set(b.peers()) == {a.node_id}
    la, lb = a._links[b.node_id], b._links[a.node_id]
    assert la.dialer_id == lb.dialer_id == min(a.node_id, b.node_id)
    a.spawn(Worker, name="w")
    assert await b.ref(a.node_id, "w").ask("x", timeout=3) == "x"


async def test_wrong_secret_is_refused(make_system) -> None:
    from actors import ClusterSecretMismatch

    a = await make_system()
    b = await make_system(secret=b"not the same secret at all......")
    with pytest.raises(ClusterSecretMismatch):
        await b.connect(*a.address)
    assert a.peers() == {} and b.peers() == {}


class WhoSent(Actor):
    def __init__(self) -> None:
        self.peers: list[str | None] = []

    async def receive(self, msg, ctx):
        self.peers.append(ctx.peer)
        return ctx.peer


async def test_ctx_peer_is_the_links_authenticated_peer_not_a_claim(make_system) -> None:
    """A remote cannot choose who it is to the handler: ctx.peer is the handshake's peer id
    for tells and asks (whatever sender name the envelope carries), None for local mail."""
    a, b = await make_system(), await make_system()
    who = WhoSent()
    ref = a.spawn(who, name="who")
    await b.connect(*a.address)
    forged_sender = b.ref(a.node_id, "who")  # a sender ref naming the receiver's own node
    b.ref(a.node_id, "who").tell("hi", sender=forged_sender)
    assert await b.ref(a.node_id, "who").ask("and you?", timeout=3) == b.node_id
    ref.tell("local")
    await until(lambda: len(who.peers) == 3, what="three messages")
    assert who.peers == [b.node_id, b.node_id, None]
