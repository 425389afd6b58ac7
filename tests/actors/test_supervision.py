"""Supervision, dead actors failing fast, graceful stop, mailbox backpressure (in-memory
transport, on virtual time: every wait below is for a condition, and the clock only moves
when nothing can run)."""

from __future__ import annotations

import asyncio

import pytest

from actors import (
    Actor, ActorDead, ActorSystem, ChildSpec, HandlerError, MailboxFull, MemoryNetwork, NodeIdentity,
    Supervisor, Terminated,
)

from actor_kit import SECRET
from waiting import settle, until

pytestmark = pytest.mark.virtual_time

starts: dict[str, int] = {}


class Child(Actor):
    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    async def on_start(self, ctx) -> None:
        starts[self.name] = starts.get(self.name, 0) + 1

    async def receive(self, msg, ctx):
        if msg == "crash":
            raise RuntimeError(f"{self.name} crashed")
        self.count += 1
        return self.count


@pytest.fixture
async def system():
    starts.clear()
    s = ActorSystem(NodeIdentity.generate(), SECRET, transport=MemoryNetwork().transport("n"))
    await s.start()
    yield s
    await s.stop()


def _started(**counts: int):
    return lambda: all(starts.get(name, 0) >= n for name, n in counts.items())


async def _crash(ref, **restarts: int) -> None:
    """Crash `ref`'s actor; then wait until the named actors reached these start counts."""
    with pytest.raises(HandlerError):
        await ref.ask("crash", timeout=2)
    await until(_started(**restarts), what=f"restarts {restarts}")


async def test_one_for_one_restarts_only_the_crashed_child(system) -> None:
    system.spawn(Supervisor([ChildSpec("a", lambda: Child("a")), ChildSpec("b", lambda: Child("b"))]), name="sup")
    await until(_started(a=1, b=1), what="both children")
    a, b = system.ref(system.node_id, "a"), system.ref(system.node_id, "b")
    assert await a.ask(1) == 1 and await b.ask(1) == 1
    await _crash(a, a=2)
    assert await a.ask(1) == 1  # fresh state
    assert await b.ask(1) == 2  # untouched
    assert starts == {"a": 2, "b": 1}


async def test_one_for_all_restarts_the_group(system) -> None:
    specs = [ChildSpec("a", lambda: Child("a")), ChildSpec("b", lambda: Child("b"))]
    system.spawn(Supervisor(specs, strategy="one_for_all"), name="sup")
    await until(_started(a=1, b=1), what="both children")
    a, b = system.ref(system.node_id, "a"), system.ref(system.node_id, "b")
    assert await b.ask(1) == 1
    await _crash(a, a=2, b=2)
    assert await b.ask(1) == 1  # b restarted with a
    assert starts == {"a": 2, "b": 2}


async def test_crashes_past_intensity_escalate_to_the_parent(system) -> None:
    inner = lambda: Supervisor([ChildSpec("leaf", lambda: Child("leaf"))], max_restarts=2, within=10)  # noqa: E731
    system.spawn(Supervisor([ChildSpec("inner", inner)], max_restarts=5, within=10), name="top")
    await until(_started(leaf=1), what="the leaf")
    leaf = system.ref(system.node_id, "leaf")
    for n in (2, 3):
        await _crash(leaf, leaf=n)
    assert starts["leaf"] == 3
    await _crash(leaf, leaf=4)  # third crash in 10 s: inner escalates, top restarts inner (and so leaf)
    await settle()
    assert starts["leaf"] == 4
    assert await leaf.ask(1) == 1


async def test_top_level_escalation_stops_for_good_and_asks_fail_fast(system) -> None:
    sup = system.spawn(Supervisor([ChildSpec("leaf", lambda: Child("leaf"))], max_restarts=1, within=10), name="sup")
    await until(_started(leaf=1), what="the leaf")
    gone: list[Terminated] = []
    system.watch(sup, gone.append)
    leaf = system.ref(system.node_id, "leaf")
    await _crash(leaf, leaf=2)
    await _crash(leaf)  # past the intensity: the top supervisor gives up
    await until(lambda: gone, what="the supervisor's Terminated")
    assert gone[0].name == "sup"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(ActorDead):
        await leaf.ask(1, timeout=5)
    with pytest.raises(ActorDead):
        sup.tell("x")
    assert loop.time() - t0 < 0.5


async def test_top_level_actor_restart_intensity(system) -> None:
    ref = system.spawn(lambda: Child("solo"), name="solo", max_restarts=2, within=10)
    await until(_started(solo=1), what="the actor")
    for n in (2, 3):
        await _crash(ref, solo=n)
    assert await ref.ask(1) == 1
    await _crash(ref)
    with pytest.raises(ActorDead):
        await ref.ask(1)


class Slow(Actor):
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.seen: list[int] = []

    async def receive(self, msg, ctx):
        await self.gate.wait()
        self.seen.append(msg)

    async def on_stop(self, ctx) -> None:
        self.seen.append(-1)


async def test_mailbox_is_bounded_and_send_waits_for_room(system) -> None:
    slow = Slow()
    ref = system.spawn(slow, name="slow", mailbox_size=4)
    ref.tell(0)
    cell = system._cells["slow"]
    await until(lambda: cell.mailbox.qsize() == 0, what="0 taken from the mailbox")  # 0 is being handled
    for i in range(1, 5):
        ref.tell(i)
    with pytest.raises(MailboxFull):
        ref.tell(5)
    sender = asyncio.create_task(ref.send(5))
    await asyncio.sleep(1.0)  # a virtual second: nothing makes room, so the send still waits
    assert not sender.done()  # backpressure: waits for room
    slow.gate.set()
    await asyncio.wait_for(sender, 2)
    await system.stop_actor(ref)
    assert slow.seen == [0, 1, 2, 3, 4, 5, -1]  # graceful stop drained the queue, then on_stop


async def test_remote_sender_is_backpressured_by_a_full_mailbox() -> None:
    net = MemoryNetwork()
    a = ActorSystem(NodeIdentity.generate(), SECRET, transport=net.transport("a"))
    b = ActorSystem(NodeIdentity.generate(), SECRET, transport=net.transport("b"))
    await a.start()
    await b.start()
    try:
        slow = Slow()
        a.spawn(slow, name="slow", mailbox_size=2)
        peer = await b.connect(*a.address)
        ref = b.ref(peer, "slow")
        for i in range(20):
            ref.tell(i)
        cell = a._cells["slow"]
        await until(lambda: cell.mailbox.full(), what="a full mailbox")
        await asyncio.sleep(1.0)  # a virtual second for the other 18 to arrive, if they could
        assert cell.mailbox.qsize() <= 2  # the rest waits in the link, not in unbounded memory
        slow.gate.set()
        await until(lambda: len(slow.seen) == 20, what="all 20 handled")
        assert slow.seen == list(range(20))  # order kept across the pause
    finally:
        await a.stop()
        await b.stop()
