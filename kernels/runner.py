"""ComputeRunner: model compute on one dedicated thread, awaited from asyncio.

Torch and numpy release the GIL inside their kernels, so the event loop keeps
serving the network while a prefill runs. One thread (not a pool) because a
Stage and its KV cache are not thread-safe and steps must run in order.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self, TypeVar

T = TypeVar("T")


class ComputeRunner:
    def __init__(self, name: str = "mesh-compute"):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._thread_id: int | None = None
        self._native_id: int | None = None
        self._executor.submit(self._record_thread).result()

    def _record_thread(self) -> None:
        self._thread_id = threading.get_ident()
        self._native_id = threading.get_native_id()

    @property
    def thread_id(self) -> int | None:
        """The compute thread's ident (for checks that compute is off the loop)."""
        return self._thread_id

    def runq_s(self) -> float | None:
        """Seconds the compute thread has been ready to run but waiting for a core (Linux's
        schedstat): what other work on the machine cost the stage. None elsewhere."""
        try:
            with open(f"/proc/self/task/{self._native_id}/schedstat") as f:
                return int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the compute thread and await its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Finish queued work and stop the thread."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InlineRunner:
    """A runner that computes on the calling thread, inside the event loop.

    Only for meshes on virtual time (``actors.clock.VirtualTimeLoop``): there a blocked
    loop costs no simulated time, and one thread makes a many-node test deterministic.
    Never on a real clock: heartbeats would stall behind every forward pass."""

    def __init__(self, name: str = "inline") -> None:
        self.name = name
        self._thread_id = threading.get_ident()

    @property
    def thread_id(self) -> int | None:
        return self._thread_id

    def runq_s(self) -> float | None:
        return None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        await asyncio.sleep(0)  # as a thread hand-off would, let the loop run first
        return fn(*args, **kwargs)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
