"""Fixtures shared by every test folder."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from actors.clock import VirtualTimeLoop

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py: the single-device reference


def pytest_asyncio_loop_factories(config, item):
    """Tests marked ``virtual_time`` run on `actors.clock.VirtualTimeLoop` (time jumps to
    the next timer when nothing is ready); the rest on asyncio's default loop."""
    if item.get_closest_marker("virtual_time") is not None:
        return {"virtual": VirtualTimeLoop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default model (SmolLM2-135M-Instruct Q4_1 GGUF), fetched into the cache once."""
    from mesh import models

    return models.resolve(models.DEFAULT_MODEL, fetch=True)


@pytest.fixture(scope="session")
def reference(model_path: Path):
    """Single-device generation in this process, memoized (tests/reference.py)."""
    from reference import Reference

    return Reference(model_path)
