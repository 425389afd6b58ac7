"""Fence and phi-accrual detector: pure functions of terms and timestamps."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from mesh.cluster.detector import DetectorConfig, FailureDetector, Liveness
from mesh.cluster.fence import Fence


@given(st.lists(st.integers(0, 20), max_size=50))
def test_fence_never_accepts_below_highest(terms: list[int]) -> None:
    fence = Fence()
    highest = 0
    for term in terms:
        accepted = fence.check(term)
        assert accepted == (term >= highest)
        highest = max(highest, term)
    assert fence.highest == highest


def test_fence_observe_then_check() -> None:
    fence = Fence(3)
    fence.observe(5)
    assert not fence.check(4, src="n1", command="place")
    assert fence.check(5)
    assert fence.rejected == 1


def lan_heartbeats(det: FailureDetector, seconds: float, jitter: float = 0.03) -> float:
    r = random.Random(1)
    t = 0.0
    while t < seconds:
        t += 0.1 + r.uniform(-jitter, jitter)
        det.heartbeat("x", t)
    return t


def test_crashed_node_is_dead_in_about_a_second() -> None:
    det = FailureDetector()
    last = lan_heartbeats(det, 10)
    assert det.state("x", last + 0.15) is Liveness.ALIVE
    assert det.state("x", last + 1.2) is Liveness.DEAD
    assert 0.6 < det.time_to_dead("x") < 1.2


def test_event_loop_hiccups_are_not_failures() -> None:
    det = FailureDetector()
    last = lan_heartbeats(det, 10, jitter=0.05)
    # a busy process (compute off-loop, GC pauses) delays a heartbeat by a few hundred ms
    assert det.state("x", last + 0.35) is Liveness.ALIVE


def test_suspect_before_dead_and_recovery() -> None:
    det = FailureDetector(DetectorConfig())
    last = lan_heartbeats(det, 5)
    states = [det.state("x", last + dt / 100) for dt in range(0, 200, 5)]
    assert states.index(Liveness.SUSPECT) < states.index(Liveness.DEAD)
    det.heartbeat("x", last + 2.0)
    assert det.state("x", last + 2.05) is Liveness.ALIVE


def test_unknown_node_is_dead_and_new_node_is_watched_at_once() -> None:
    det = FailureDetector()
    assert det.state("ghost", 0.0) is Liveness.DEAD
    det.heartbeat("y", 0.0)
    assert det.state("y", 0.05) is Liveness.ALIVE
    assert det.state("y", 1.5) is Liveness.DEAD
