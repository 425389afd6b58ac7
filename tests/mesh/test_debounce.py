"""The coordinator's re-plan debounce (mesh/pipeline/coordinator.py: `Debounce`), with
plain numbers for time: every request restarts the wait with its own delay, the wait
ends once, and a cancelled wait never ends."""

from __future__ import annotations

from mesh.pipeline.coordinator import Debounce


def test_nothing_fires_before_a_request():
    debounce = Debounce()
    assert debounce.due is None and not debounce.fire(100.0)


def test_the_wait_ends_once_at_its_due_time():
    debounce = Debounce()
    assert debounce.request(10.0, 0.3) == 10.3
    assert not debounce.fire(10.29)
    assert debounce.fire(10.3)
    assert not debounce.fire(10.3) and not debounce.fire(50.0)  # once
    assert debounce.due is None


def test_each_request_restarts_the_wait_so_a_burst_gives_one_plan():
    debounce = Debounce()
    debounce.request(10.0, 0.3)
    assert debounce.request(10.2, 0.3) == 10.5  # a join during the wait: the wait starts over
    assert not debounce.fire(10.3)  # the first request's due time passed: nothing yet
    assert debounce.fire(10.5)
    assert not debounce.fire(10.6)


def test_a_later_request_with_a_shorter_delay_brings_the_wait_forward():
    debounce = Debounce()
    debounce.request(10.0, 0.3)  # a join
    assert debounce.request(10.1, 0.02) == 10.12  # then a lost stage: re-plan almost at once
    assert debounce.fire(10.12)


def test_a_cancelled_wait_never_fires_until_requested_again():
    debounce = Debounce()
    debounce.request(10.0, 0.3)
    debounce.cancel()  # stepped down
    assert debounce.due is None and not debounce.fire(11.0)
    debounce.request(20.0, 0.3)
    assert debounce.fire(20.3)


def test_a_timer_that_fires_a_rounding_error_early_still_fires():
    """asyncio runs a timer up to its clock's resolution early, and now + (due - now) need
    not round back to due: a debounce that refused then never re-planned (a node that
    rejoined after a crash was never given layers again)."""
    d = Debounce()
    due = d.request(1.7359999999999984, 0.3)
    assert d.fire(due - 1e-12)
