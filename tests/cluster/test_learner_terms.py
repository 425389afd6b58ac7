"""A learner (an admitted member without a vote; under `--admit auto`, any key holding the
secret once the seats are taken) moves no term (issue 17): its higher-term responses used
to depose the coordinator, so one key could force an election whenever it liked. Pure
tests on `Election`."""

from __future__ import annotations

from structlog.testing import capture_logs

from mesh.cluster import messages as m
from mesh.cluster.admission import Admission, Mode

from test_admission import A, B, C, coordinator, follower_of_b

LEARNER = "1ea4e21ea4e21e00"  # admitted after the seats were taken


def coordinator_with_a_learner():
    e = coordinator(Admission(Mode.AUTO))
    e.step(m.JoinRequest(LEARNER))
    e.step(m.AppendResponse(e.term, B, True, e.last_index))  # the admission committed
    assert LEARNER in e.members and LEARNER not in e.voters and e.commit == e.last_index
    return e


def test_a_learners_higher_term_responses_do_not_depose_the_coordinator() -> None:
    e = coordinator_with_a_learner()
    term = e.term
    with capture_logs() as logs:
        e.step(m.AppendResponse(term + 5, LEARNER, False, 0))
        e.step(m.VoteResponse(term + 6, LEARNER, False))
        e.step(m.VoteResponse(term + 7, LEARNER, True))
    assert e.is_coordinator and e.term == term
    refused = [x for x in logs if x["event"] == "election.not_a_member_refused"]
    assert {x["peer"] for x in refused} == {LEARNER} and len(refused) == 3


def test_a_learners_responses_of_the_current_term_still_count() -> None:
    e = coordinator_with_a_learner()
    e.step(m.AppendResponse(e.term, LEARNER, True, e.last_index))
    assert e.is_coordinator and e._progress[LEARNER].match == e.last_index


def test_a_voters_higher_term_response_still_deposes_the_coordinator() -> None:
    e = coordinator_with_a_learner()
    term = e.term
    e.step(m.AppendResponse(term + 1, C, False, 0))
    assert not e.is_coordinator and e.term == term + 1


def test_a_follower_ignores_a_learners_higher_term_too() -> None:
    e = follower_of_b()
    e.step(m.Append(3, B, 2, 3, (m.Entry(3, (A, B, C), (A, B, C, LEARNER)),), 3))
    assert LEARNER in e.members
    e.step(m.AppendResponse(9, LEARNER, False, 0))
    assert (e.term, e.leader) == (3, B)
