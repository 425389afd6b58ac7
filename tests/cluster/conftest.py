"""Fixtures of the cluster tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/netns.py

from netns import NetnsLab, netns_skip_reason  # noqa: E402


@pytest.fixture
def lab3() -> Iterator[NetnsLab]:
    reason = netns_skip_reason()
    if reason:
        pytest.skip(reason)
    with NetnsLab(3) as lab:
        yield lab


@pytest.fixture(autouse=True)
def _quiet_simulator(request: pytest.FixtureRequest) -> Iterator[None]:
    """Silence structlog only while the election simulator runs, and restore it after."""
    if "sim" not in request.module.__name__:
        yield
        return
    from cluster_sim import silenced_logs

    with silenced_logs():
        yield
