"""The in-process mesh on virtual time (mesh/testing/inproc.py): one event loop per
module, and the meshes a module's tests share on it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from actors.clock import VirtualTimeLoop
from memory_lock import exclusive


@pytest.fixture(scope="package", autouse=True)
def _memory_heavy() -> Iterator[None]:
    """The in-process meshes hold GBs: never beside the real-model checks (tests/lanes.py)."""
    with exclusive():
        yield


@pytest.fixture(scope="module")
def vrun() -> Iterator[Callable[[Any], Any]]:
    """Run a coroutine on this module's virtual-time loop (the loop, and with it every
    mesh started on it, lives until the module's last test)."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        yield runner.run
