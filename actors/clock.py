"""Time from outside: the `Clock` adapters read, and a virtual-time event loop for tests.

Adapters never call ``time.monotonic()`` or ``loop.call_later`` themselves: they are
given a `Clock`. The default, `LoopClock`, is the running event loop's own clock, so on
asyncio's loops it is real monotonic time.

`VirtualTimeLoop` is an event loop whose clock only moves when nothing is ready to run:
then it jumps straight to the next timer. A test of many nodes in one process on the
memory transport, with compute run inline, is then deterministic and takes as long as
its compute, not as long as its timeouts (trio's ``MockClock(autojump_threshold=0)``
does the same). Work handed to another thread (``run_in_executor``) stops the clock
until it reports back, so a thread never sees virtual seconds fly by while it runs.

    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(scenario())
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

# Where a virtual loop's wall clock starts (2027-01-01T00:00:00Z): a fixed, readable epoch.
VIRTUAL_EPOCH = 1_798_761_600.0


class Clock(Protocol):
    """What an adapter may ask of time."""

    def now(self) -> float:
        """Monotonic seconds."""

    def wall(self) -> float:
        """Seconds since the Unix epoch, for timestamps people read (never for ordering)."""

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> asyncio.TimerHandle:
        """Run ``callback(*args)`` on the event loop after ``delay`` seconds."""

    async def sleep(self, delay: float) -> None: ...


class LoopClock:
    """The running event loop's clock: real time on asyncio's loops, virtual on a
    `VirtualTimeLoop`. Outside a running loop, ``now`` and ``wall`` read the OS clocks."""

    def now(self) -> float:
        loop = _running_loop()
        return loop.time() if loop is not None else time.monotonic()

    def wall(self) -> float:
        loop = _running_loop()
        if isinstance(loop, VirtualTimeLoop):
            return VIRTUAL_EPOCH + loop.time()
        return time.time()

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback, *args)

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))


LOOP_CLOCK = LoopClock()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _VirtualSelector(selectors.BaseSelector):
    """The loop's selector: real file descriptors are still polled (the loop's own wake-up
    pipe, any real socket), but a wait for a timer is a jump of the virtual clock."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._real = selectors.DefaultSelector()

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return self._real.select(0)
        if self._loop.external:  # another thread works for us: time stands still until it reports
            return self._real.select(None)
        ready = self._real.select(0)
        if ready or timeout is None:  # nothing scheduled at all: only real I/O can wake us
            return ready or self._real.select(None)
        self._loop.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (see the module docstring)."""

    def __init__(self) -> None:
        self._virtual_now = 0.0
        self.external = 0  # executor jobs in flight
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += seconds

    def run_in_executor(self, executor: Any, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self.external += 1
        future.add_done_callback(self._external_done)
        return future

    def _external_done(self, _future: asyncio.Future) -> None:
        self.external -= 1


class ManualClock:
    """A clock a test moves by hand (``advance``); its timers fire as it passes them.
    For one object under test; a whole mesh runs on a `VirtualTimeLoop` instead."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._timers: list[tuple[float, int, asyncio.TimerHandle]] = []
        self._count = 0

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return VIRTUAL_EPOCH + self._now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> asyncio.TimerHandle:
        loop = asyncio.get_event_loop()
        handle = asyncio.TimerHandle(self._now + max(0.0, delay), callback, args, loop)
        self._count += 1
        self._timers.append((handle.when(), self._count, handle))
        self._timers.sort(key=lambda t: t[:2])
        return handle

    async def sleep(self, delay: float) -> None:
        future = asyncio.get_event_loop().create_future()
        self.call_later(delay, lambda: future.done() or future.set_result(None))
        await future

    def advance(self, seconds: float) -> None:
        """Move time on, running every timer due by then in order."""
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            when, _, handle = self._timers.pop(0)
            self._now = max(self._now, when)
            if not handle.cancelled():
                handle._run()
        self._now = target
