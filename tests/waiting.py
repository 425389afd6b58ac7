"""Waiting in tests on a condition, never for a guessed length of time.

`until(predicate)` returns as soon as the condition holds (checked after every turn
of the event loop's ready work, at most every `poll` seconds) and fails the test with
what it waited for once `timeout` passes. On a `VirtualTimeLoop` the same call is
deterministic: the virtual clock only moves when nothing else can run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "the condition",
                poll: float = 0.005) -> float:
    """Wait until ``predicate()`` is true; return the seconds waited (loop clock)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(poll)
    return loop.time() - start


async def settle(turns: int = 20) -> None:
    """Let every task that is ready run `turns` loop iterations, without letting time
    pass on purpose: for asserting that something has NOT happened after the work that
    could cause it has been handed to the loop."""
    for _ in range(turns):
        await asyncio.sleep(0)
