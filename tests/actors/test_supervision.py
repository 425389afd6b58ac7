"""Supervision, dead actors failing fast, graceful stop, mailbox backpressure (in-memory transport)."""

from __future__ import annotations

import asyncio

import pytest

from actors import (
    Actor, ActorDead, ActorSystem, ChildSpec, HandlerError, MailboxFull, MemoryNetwork, NodeIdentity,
    Supervisor, Terminated,
)

from actor_kit import SECRET

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


async def _crash(ref) -> None:
    with pytest.raises(HandlerError):
        await ref.ask("crash", timeout=2)
    await asyncio.sleep(0.01)


async def test_one_for_one_restarts_only_the_crashed_child(system) -> None:
    system.spawn(Supervisor([ChildSpec("a", lambda: Child("a")), ChildSpec("b", lambda: Child("b"))]), name="sup")
    await asyncio.sleep(0.01)
    a, b = system.ref(system.node_id, "a"), system.ref(system.node_id, "b")
    assert await a.ask(1) == 1 and await b.ask(1) == 1
    await _crash(a)
    assert await a.ask(1) == 1  # fresh state
    assert await b.ask(1) == 2  # untouched
    assert starts == {"a": 2, "b": 1}


async def test_one_for_all_restarts_the_group(system) -> None:
    specs = [ChildSpec("a", lambda: Child("a")), ChildSpec("b", lambda: Child("b"))]
    system.spawn(Supervisor(specs, strategy="one_for_all"), name="sup")
    await asyncio.sleep(0.01)
    a, b = system.ref(system.node_id, "a"), system.ref(system.node_id, "b")
    assert await b.ask(1) == 1
    await _crash(a)
    assert await b.ask(1) == 1  # b restarted with a
    assert starts == {"a": 2, "b": 2}


async def test_crashes_past_intensity_escalate_to_the_parent(system) -> None:
    inner = lambda: Supervisor([ChildSpec("leaf", lambda: Child("leaf"))], max_restarts=2, within=10)  # noqa: E731
    system.spawn(Supervisor([ChildSpec("inner", inner)], max_restarts=5, within=10), name="top")
    await asyncio.sleep(0.01)
    leaf = system.ref(system.node_id, "leaf")
    for _ in range(2):
        await _crash(leaf)
    assert starts["leaf"] == 3
    await _crash(leaf)  # third crash in 10 s: inner escalates, top restarts inner (and so leaf)
    await asyncio.sleep(0.05)
    assert starts["leaf"] == 4
    assert await leaf.ask(1) == 1


async def test_top_level_escalation_stops_for_good_and_asks_fail_fast(system) -> None:
    sup = system.spawn(Supervisor([ChildSpec("leaf", lambda: Child("leaf"))], max_restarts=1, within=10), name="sup")
    await asyncio.sleep(0.01)
    gone: list[Terminated] = []
    system.watch(sup, gone.append)
    leaf = system.ref(system.node_id, "leaf")
    await _crash(leaf)
    await _crash(leaf)
    await asyncio.sleep(0.05)
    assert gone and gone[0].name == "sup"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(ActorDead):
        await leaf.ask(1, timeout=5)
    with pytest.raises(ActorDead):
        sup.tell("x")
    assert loop.time() - t0 < 0.5


async def test_top_level_actor_restart_intensity(system) -> None:
    ref = system.spawn(lambda: Child("solo"), name="solo", max_restarts=2, within=10)
    await asyncio.sleep(0.01)
    for _ in range(2):
        await _crash(ref)
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
    await asyncio.sleep(0.01)  # 0 is being handled, the mailbox is empty
    for i in range(1, 5):
        ref.tell(i)
    with pytest.raises(MailboxFull):
        ref.tell(5)
    sender = asyncio.create_task(ref.send(5))
    await asyncio.sleep(0.05)
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
        await asyncio.sleep(0.05)
        cell = a._cells["slow"]
        assert cell.mailbox.qsize() <= 2  # the rest waits in the link, not in unbounded memory
        slow.gate.set()
        for _ in range(100):
            if len(slow.seen) == 20:
                break
            await asyncio.sleep(0.01)
        assert slow.seen == list(range(20))  # order kept across the pause
    finally:
        await a.stop()
        await b.stop()
