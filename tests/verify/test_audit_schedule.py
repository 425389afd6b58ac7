"""When the auditor runs its passes (mesh/verify/schedule.py), with plain numbers for time:
a session's first pass and escalations at once, later passes between answers (while this
node's stage is idle) but never later than the deferral bound; probation; the order of
the passes waiting for the audit process. No event loop: `_Run` plays requests and the
schedule's own `CheckAt`s in time order, as the auditor's timers would."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.verify.schedule import (
    FIRST_GATHER_S,
    IDLE_S,
    PROBATION_SESSIONS,
    RECHECK_S,
    AuditSchedule,
    CheckAt,
    Outcome,
    StartPass,
    TrackKey,
    Turn,
    Turns,
)


def _key(session: str = "s1", round_: int = 1, *, stage: int = 1, node: str = "n1", version: int = 1) -> TrackKey:
    return TrackKey(1, version, session, stage, node, round_)


class _Stage:
    """This node's own stage as the schedule sees it: computing in the given intervals."""

    def __init__(self, *busy: tuple[float, float]) -> None:
        self.busy = sorted(busy)

    def idle_s(self, now: float) -> float:
        last_end = -math.inf
        for start, end in self.busy:
            if start <= now < end:
                return 0.0
            if end <= now:
                last_end = max(last_end, end)
        return now - last_end


@dataclass
class _Pass:
    key: TrackKey
    first: float  # its first request
    requests: list[int] = field(default_factory=list)  # ids of the requests it runs
    checks: list[float] = field(default_factory=list)  # when the schedule looked at it
    started: float | None = None
    track_open: bool = False  # a pass of its track had started when it opened
    kind: str = ""  # what the property test expects it to be treated as


class _Run:
    """Plays requests against an `AuditSchedule` the way the auditor does: a `CheckAt`
    is a timer, the track is open once its first pass started."""

    def __init__(self, schedule: AuditSchedule, stage: _Stage) -> None:
        self.schedule, self.stage = schedule, stage
        self.now = 0.0
        self.timers: list[tuple[float, int, TrackKey]] = []
        self.order = 0
        self.open: set[TrackKey] = set()
        self.gathering: dict[TrackKey, _Pass] = {}
        self.passes: list[_Pass] = []
        self.requests = 0

    def request(self, key: TrackKey, at: float) -> _Pass | None:
        """Returns the pass this request opened (None: it joined one)."""
        self.run_until(at)
        self.requests += 1
        joins = key in self.gathering
        if not joins:
            self.gathering[key] = _Pass(key, at, track_open=key in self.open)
        self.gathering[key].requests.append(self.requests)
        action = self.schedule.request(key, at, track_open=key in self.open)
        assert (action is None) == joins  # a request joins the gathering under way, or opens one
        self._carry_out(action)
        return None if joins else self.gathering[key]

    def run_until(self, t: float) -> None:
        while self.timers and self.timers[0][0] <= t:
            self.now, _, key = heapq.heappop(self.timers)
            self.gathering[key].checks.append(self.now)
            self._carry_out(self.schedule.wake(key, self.now, self.stage.idle_s(self.now)))
        self.now = max(self.now, t)

    def _carry_out(self, action) -> None:
        if isinstance(action, CheckAt):
            assert action.at >= self.now
            self.order += 1
            heapq.heappush(self.timers, (action.at, self.order, action.key))
        elif isinstance(action, StartPass):
            done = self.gathering.pop(action.key)
            done.started = self.now
            self.passes.append(done)
            self.open.add(action.key)
        else:
            assert action is None

    def started(self, key: TrackKey) -> list[float]:
        return [p.started for p in self.passes if p.key == key]


def _scenario(busy_for: float, *, gather_s: float = 0.2, defer_s: float = 1.5) -> tuple[_Run, float]:
    """A first request, then later ones while the stage decodes from 0 to ``busy_for``:
    the run and the time the later requests began."""
    run = _Run(AuditSchedule(gather_s=gather_s, defer_s=defer_s), _Stage((0.0, busy_for)))
    run.request(_key(), 0.0)
    later_from = 0.4  # the first pass ran after 0.2 s (min(gather, 0.25))
    run.request(_key(), later_from)  # step 5
    run.request(_key(), later_from + 0.1)  # step 9: joins the same pass
    run.request(_key(round_=2), later_from + 0.1)  # an escalation of step 5: at once
    run.run_until(60.0)
    return run, later_from


def test_first_pass_and_escalation_at_once_later_passes_wait_for_the_answer_to_end():
    run, later_from = _scenario(busy_for=1.0)
    first, escalation, later = run.passes
    assert first.key == _key() and first.requests == [1] and first.started == pytest.approx(0.2)
    assert first.started < later_from  # gathered briefly, while the stage decoded
    assert escalation.key == _key(round_=2) and escalation.started == pytest.approx(later_from + 0.1)
    assert later.requests == [2, 3]  # the later requests, gathered into one pass
    # held while the stage computed (until 1.0), run at the first look once it idled IDLE_S
    assert 1.0 + IDLE_S <= later.started < 1.0 + IDLE_S + RECHECK_S
    assert later.started == pytest.approx(1.6)  # 0.6, then every 0.25 s: 0.85, 1.1, 1.35, 1.6
    assert all(b - a <= RECHECK_S + 1e-9 for a, b in zip(later.checks, later.checks[1:]))
    assert len(run.passes) == 3 and not run.gathering


def test_a_stage_that_never_idles_still_gets_audited_by_the_deadline():
    run, later_from = _scenario(busy_for=30.0, defer_s=1.5)
    later = run.passes[2]
    assert later.requests == [2, 3]
    assert later.started == pytest.approx(later_from + 1.5)  # the bound, counted from the pass's first request
    assert later.checks[-2] < later.started  # the last look came short of the deadline: it was looked at again


def test_an_idle_stage_gives_the_plain_gather():
    run, later_from = _scenario(busy_for=0.0, gather_s=0.2)
    later = run.passes[2]
    assert later.requests == [2, 3] and later.started == pytest.approx(later_from + 0.2)
    assert later.checks == [later.started]  # no holding


def test_a_first_pass_on_probation_gathers_for_at_most_a_quarter_second_even_while_decoding():
    run = _Run(AuditSchedule(gather_s=1.0, defer_s=20.0), _Stage((0.0, 100.0)))
    run.request(_key(), 3.0)
    run.run_until(10.0)
    assert run.started(_key()) == [pytest.approx(3.0 + FIRST_GATHER_S)]
    short = _Run(AuditSchedule(gather_s=0.1), _Stage((0.0, 100.0)))
    short.request(_key(), 3.0)
    short.run_until(10.0)
    assert short.started(_key()) == [pytest.approx(3.1)]  # a shorter gather time wins


def test_an_escalation_starts_at_once_even_past_probation_and_while_decoding():
    schedule = AuditSchedule()
    for session in ("a", "b"):
        schedule.judged(_key(session), opened_session=True, outcome=Outcome.CLEAN)
    key = _key(round_=2)
    assert schedule.request(key, 7.0, track_open=False) == CheckAt(key, 7.0)
    assert schedule.wake(key, 7.0, stage_idle_s=0.0) == StartPass(key)


def test_requests_while_a_pass_gathers_join_it_and_a_started_pass_opens_a_new_gathering():
    schedule = AuditSchedule(gather_s=1.0, defer_s=20.0)
    key = _key()
    assert schedule.request(key, 0.0, track_open=True) == CheckAt(key, 1.0)
    assert schedule.request(key, 0.5, track_open=True) is None
    assert schedule.wake(key, 1.0, stage_idle_s=math.inf) == StartPass(key)
    assert schedule.wake(key, 1.0, stage_idle_s=math.inf) is None  # nothing gathers any more
    assert schedule.request(key, 1.2, track_open=True) == CheckAt(key, 2.2)
    other = _key("s2")  # another session gathers on its own
    assert schedule.request(other, 1.3, track_open=True) == CheckAt(other, 2.3)


def test_a_node_past_probation_has_its_sessions_first_pass_wait_for_the_answer_to_end():
    """Two sessions whose first pass came back clean take the node off probation for that
    stage: a new session's first pass then waits like a later one; a failure puts it back."""

    def first_pass_start(cleared_sessions: int, then_fail: bool) -> float:
        run = _Run(AuditSchedule(gather_s=0.2, defer_s=1.5), _Stage((0.0, 30.0)))  # decodes throughout
        for k in range(cleared_sessions):  # earlier sessions' clean first passes
            run.schedule.judged(_key(f"old{k}"), opened_session=True, outcome=Outcome.CLEAN)
        if then_fail:  # a later pass of an old session failed
            run.schedule.judged(_key("old0"), opened_session=False, outcome=Outcome.FAILED)
        run.request(_key(), 0.0)
        run.run_until(60.0)
        (started,) = run.started(_key())
        return started

    assert first_pass_start(PROBATION_SESSIONS - 1, then_fail=False) == pytest.approx(0.2)  # at once
    assert first_pass_start(PROBATION_SESSIONS, then_fail=False) == pytest.approx(1.5)  # waits (here: the bound)
    assert first_pass_start(PROBATION_SESSIONS, then_fail=True) == pytest.approx(0.2)


def test_probation_counts_only_clean_first_passes_of_round_one_per_stage_and_plan():
    schedule = AuditSchedule()
    key = _key()
    assert schedule.on_probation(key)
    schedule.judged(_key("a"), opened_session=True, outcome=Outcome.CLEAN)
    schedule.judged(_key("a"), opened_session=False, outcome=Outcome.CLEAN)  # a later pass: no
    schedule.judged(_key("b", round_=2), opened_session=True, outcome=Outcome.CLEAN)  # an escalation: no
    schedule.judged(_key("c"), opened_session=True, outcome=Outcome.INCONCLUSIVE)  # unreachable: no
    assert schedule.on_probation(key)
    schedule.judged(_key("d"), opened_session=True, outcome=Outcome.CLEAN)
    assert not schedule.on_probation(key)
    # kept per (term, version, stage, node): another stage, plan or node is still on probation
    assert schedule.on_probation(_key(stage=2)) and schedule.on_probation(_key(version=2))
    assert schedule.on_probation(_key(node="n2"))
    schedule.judged(_key("e"), opened_session=False, outcome=Outcome.INCONCLUSIVE)
    assert not schedule.on_probation(key)  # an inconclusive pass does not restore it
    schedule.judged(_key("e", round_=2), opened_session=False, outcome=Outcome.FAILED)
    assert schedule.on_probation(key)  # any failure does, an escalation's too
    schedule.judged(_key("f"), opened_session=True, outcome=Outcome.CLEAN)
    assert schedule.on_probation(key)  # counting starts over
    schedule.judged(_key("g"), opened_session=True, outcome=Outcome.CLEAN)
    assert not schedule.on_probation(key)


def test_probation_records_are_bounded_oldest_first():
    schedule = AuditSchedule(probation_sessions=1, max_producers=3)
    for node in ("n1", "n2", "n3", "n4"):
        schedule.judged(_key(node=node), opened_session=True, outcome=Outcome.CLEAN)
    assert len(schedule.cleared) == 3
    assert schedule.on_probation(_key(node="n1"))  # dropped: on probation again
    assert not any(schedule.on_probation(_key(node=n)) for n in ("n2", "n3", "n4"))


def test_the_turn_puts_escalations_first_then_a_first_pass_on_probation_then_the_rest():
    schedule = AuditSchedule()
    key = _key()
    assert schedule.turn(_key(round_=2), from_start=True) is Turn.ESCALATION
    assert schedule.turn(_key(round_=2), from_start=False) is Turn.ESCALATION
    assert schedule.turn(key, from_start=True) is Turn.PROBATION_FIRST_PASS
    assert schedule.turn(key, from_start=False) is Turn.LATER
    for session in ("a", "b"):
        schedule.judged(_key(session), opened_session=True, outcome=Outcome.CLEAN)
    assert schedule.turn(key, from_start=True) is Turn.LATER  # past probation: like the rest
    assert Turn.ESCALATION < Turn.PROBATION_FIRST_PASS < Turn.LATER


def test_turns_go_to_the_most_urgent_waiter_then_in_order_of_arrival():
    turns = Turns()
    assert turns.ask("running", Turn.LATER) and turns.holder == "running"
    assert not turns.ask("later-1", Turn.LATER)
    assert not turns.ask("first-pass", Turn.PROBATION_FIRST_PASS)
    assert not turns.ask("later-2", Turn.LATER)
    assert not turns.ask("escalation", Turn.ESCALATION)
    order = [turns.release() for _ in range(4)]
    assert order == ["escalation", "first-pass", "later-1", "later-2"]
    assert turns.release() is None and turns.holder is None
    assert turns.ask("next", Turn.LATER)  # free again: at once


def test_a_withdrawn_waiter_is_skipped_and_a_withdrawn_holder_passes_the_turn_on():
    turns = Turns()
    turns.ask("a", Turn.LATER)
    turns.ask("b", Turn.ESCALATION)
    turns.ask("c", Turn.LATER)
    assert turns.withdraw("b") is None  # cancelled while waiting
    assert turns.release() == "c"
    turns.ask("d", Turn.LATER)
    assert turns.withdraw("c") == "d"  # cancelled as it was handed the turn: it moves on
    assert turns.release() is None


# -- properties ------------------------------------------------------------------------

_requests = st.lists(
    st.tuples(st.floats(0.0, 0.6), st.sampled_from(["s1", "s2", "s3"]), st.sampled_from([1, 1, 1, 2]),
              st.sampled_from(["n1", "n2"])),
    max_size=40)
_busy = st.lists(st.tuples(st.floats(0.0, 40.0), st.floats(0.0, 8.0)), max_size=6)
_outcomes = st.lists(st.sampled_from(list(Outcome)), min_size=40, max_size=40)


@settings(max_examples=300, deadline=None)
@given(requests=_requests, busy=_busy, outcomes=_outcomes,
       gather_s=st.sampled_from([0.1, 0.2, 1.0]), defer_s=st.sampled_from([0.5, 1.5, 20.0]))
def test_every_request_runs_in_exactly_one_pass_started_within_its_bounds(requests, busy, outcomes, gather_s,
                                                                         defer_s):
    """However requests and the stage's activity interleave: every request runs in exactly
    one pass; an escalation starts at once, a first pass on probation after min(gather,
    0.25 s); any other pass not before its gather time, held only while the stage computed
    within IDLE_S and looked at again at least every RECHECK_S, and never after its
    deadline. Probation follows the clean first passes since the node's last failure."""
    stage = _Stage(*((start, start + length) for start, length in busy))
    run = _Run(AuditSchedule(gather_s=gather_s, defer_s=defer_s), stage)
    clean: dict[str, int] = {}  # node -> clean first passes since its last failure (the model)
    judged = 0
    at = 0.0
    for gap, session, round_, node in requests:
        at += gap
        key = _key(session, round_, node=node)
        opened = run.request(key, at)
        if opened is not None:
            opened.kind = ("escalation" if round_ > 1 else
                           "probation" if not opened.track_open and clean.get(node, 0) < PROBATION_SESSIONS
                           else "later")
        # judge every pass that started so far, as the auditor does when each comes back
        for p in run.passes[judged:]:
            outcome = outcomes[judged % len(outcomes)]
            opened = p.key not in {q.key for q in run.passes[:judged]}
            run.schedule.judged(p.key, opened_session=opened, outcome=outcome)
            if outcome is Outcome.FAILED:
                clean[p.key.node] = 0
            elif outcome is Outcome.CLEAN and opened and p.key.round == 1:
                clean[p.key.node] = clean.get(p.key.node, 0) + 1
            judged += 1
            assert run.schedule.on_probation(p.key) == (clean.get(p.key.node, 0) < PROBATION_SESSIONS)
    run.run_until(at + gather_s + defer_s + 1.0)

    assert not run.gathering  # nothing left waiting
    ran = sorted(r for p in run.passes for r in p.requests)
    assert ran == list(range(1, run.requests + 1))  # each request exactly once
    for p in run.passes:
        kind, start = p.kind, p.started
        assert start is not None
        if kind == "escalation":
            assert start == p.first
        elif kind == "probation":
            assert start == pytest.approx(p.first + min(gather_s, FIRST_GATHER_S))
        else:
            deadline = p.first + defer_s
            assert p.first + gather_s <= start + 1e-9
            assert start <= max(deadline, p.first + gather_s) + 1e-9
            for held in p.checks[:-1]:  # every look that did not start it: the stage was decoding
                assert stage.idle_s(held) < IDLE_S and held < deadline
            if start < deadline - 1e-9:  # started before its deadline: only because the stage idled
                assert stage.idle_s(start) >= IDLE_S
            assert all(b - a <= RECHECK_S + 1e-9 for a, b in zip(p.checks, p.checks[1:]))


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["ask", "ask", "release", "withdraw"]), st.sampled_from(list(Turn)),
                              st.integers(0, 1000)), max_size=60))
def test_turns_hand_the_audit_process_to_each_waiter_once_most_urgent_first(ops):
    """Whatever the asks, releases and withdrawals: one holder at a time; a release hands
    the audit process to the waiter of the lowest turn, the earliest among equals; every
    ticket not withdrawn while it waited holds it exactly once."""
    turns = Turns()
    waiting: list[tuple[int, int, int]] = []  # the model: (turn, arrival, ticket)
    held: list[int] = []
    withdrawn: set[int] = set()
    tickets = 0

    def release() -> None:
        expected = min(waiting)[2] if waiting else None
        assert turns.release() == expected == turns.holder
        if waiting:
            waiting.remove(min(waiting))
            held.append(expected)

    for op, turn, pick in ops:
        if op == "ask":
            tickets += 1
            if turns.ask(tickets, turn):
                assert turns.holder == tickets and not waiting
                held.append(tickets)
            else:
                waiting.append((int(turn), tickets, tickets))
        elif op == "release" and turns.holder is not None:
            release()
        elif op == "withdraw" and waiting:
            gone = waiting.pop(pick % len(waiting))[2]
            withdrawn.add(gone)
            assert turns.withdraw(gone) is None
    while turns.holder is not None:  # everyone still waiting gets it in the end, in order
        release()
    assert not waiting
    assert sorted(held) == sorted(set(range(1, tickets + 1)) - withdrawn)  # each once
