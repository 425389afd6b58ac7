"""Whether a new node founds a home cluster (mesh/cluster/bootstrap.py), with plain
numbers for time: every branch of the decision, and when a voter never heard from
counts as dead."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.cluster.bootstrap import SETTLE_S, Bootstrap, Decision, Peer

WAIT = 1.0


def _started(node_id: str = "b", *, campaign: bool = True, at: float = 10.0) -> Bootstrap:
    bootstrap = Bootstrap(node_id, WAIT, campaign=campaign)
    bootstrap.start(at)
    return bootstrap


def _peer(node_id: str, *, alive: bool = True, configured: bool = False, campaigns: bool = True) -> Peer:
    return Peer(node_id, alive, configured, campaigns)


def test_nothing_is_decided_before_discovery_runs():
    bootstrap = Bootstrap("a", WAIT)
    assert bootstrap.decide(1e9, has_log=False, heard=[]) is Decision.WAIT
    assert not bootstrap.settled(1e9)


def test_a_node_with_a_log_never_founds():
    bootstrap = _started("a")
    assert bootstrap.decide(10.0, has_log=True, heard=[]) is Decision.MEMBER
    assert bootstrap.decide(100.0, has_log=True, heard=[]) is Decision.MEMBER


def test_it_waits_the_bootstrap_time_from_discovery_start_then_founds_alone():
    bootstrap = _started("a", at=10.0)
    assert bootstrap.decide(10.0, has_log=False, heard=[]) is Decision.WAIT
    assert bootstrap.decide(10.0 + WAIT - 0.01, has_log=False, heard=[]) is Decision.WAIT
    assert bootstrap.decide(10.0 + WAIT, has_log=False, heard=[]) is Decision.FOUND


def test_an_alive_peer_in_a_cluster_means_join_even_for_the_lowest_id():
    bootstrap = _started("a")
    heard = [_peer("b", configured=True)]
    assert bootstrap.decide(20.0, has_log=False, heard=heard) is Decision.JOIN
    # a configured peer the detector holds dead is no cluster to join: the lowest id founds
    assert bootstrap.decide(20.0, has_log=False, heard=[_peer("b", configured=True, alive=False)]) is Decision.FOUND
    # joining comes first, before the campaign question: a no-campaign node joins too
    quiet = _started("a", campaign=False)
    assert quiet.decide(20.0, has_log=False, heard=heard) is Decision.JOIN


def test_it_waits_for_a_hinted_node_not_heard_from_yet_but_not_for_ever():
    bootstrap = _started("b", at=10.0)
    bootstrap.hint("a", 10.8)  # discovery named a node with a lower id; no heartbeat yet
    assert bootstrap.decide(11.0, has_log=False, heard=[]) is Decision.AWAIT_HINTED
    assert bootstrap.decide(10.8 + WAIT - 0.01, has_log=False, heard=[]) is Decision.AWAIT_HINTED
    assert bootstrap.decide(10.8 + WAIT, has_log=False, heard=[]) is Decision.FOUND  # it stayed silent
    # heard from (alive, a new node with a lower id): no more waiting, it defers to it
    assert bootstrap.decide(11.0, has_log=False, heard=[_peer("a")]) is Decision.DEFER
    # heard from once, dead now: not a reason to wait, and no founder either
    assert bootstrap.decide(11.0, has_log=False, heard=[_peer("a", alive=False)]) is Decision.FOUND


def test_a_hint_keeps_its_first_time():
    bootstrap = _started("b", at=10.0)
    bootstrap.hint("a", 10.0)
    bootstrap.hint("a", 10.9)  # rediscovered: the wait still counts from the first hint
    assert bootstrap.decide(10.0 + WAIT, has_log=False, heard=[]) is Decision.FOUND


def test_a_node_that_never_campaigns_never_founds():
    bootstrap = _started("a", campaign=False)
    assert bootstrap.decide(100.0, has_log=False, heard=[]) is Decision.NEVER
    assert bootstrap.decide(100.0, has_log=False, heard=[_peer("b")]) is Decision.NEVER


def test_only_the_lowest_id_among_alive_campaigning_new_nodes_founds():
    heard = [_peer("c"), _peer("e")]
    assert _started("b").decide(20.0, has_log=False, heard=heard) is Decision.FOUND
    assert _started("d").decide(20.0, has_log=False, heard=heard) is Decision.DEFER
    # a lower id that never campaigns, or is dead, founds nothing: it does not hold us back
    assert _started("d").decide(20.0, has_log=False, heard=[_peer("a", campaigns=False), _peer("e")]) \
        is Decision.FOUND
    assert _started("d").decide(20.0, has_log=False, heard=[_peer("a", alive=False), _peer("e")]) is Decision.FOUND


@given(ids=st.lists(st.text("0123456789abcdef", min_size=4, max_size=4), min_size=1, max_size=8, unique=True),
       quiet=st.lists(st.booleans(), min_size=8, max_size=8))
def test_among_new_nodes_that_all_hear_each_other_exactly_one_founds(ids, quiet):
    """Nodes that all see each other alive and unconfigured: exactly one founds, the lowest
    id of those that campaign (none if none campaigns)."""
    campaigns = {n: not quiet[i] or i == 0 for i, n in enumerate(ids)}  # the first always campaigns
    founders = []
    for me in ids:
        bootstrap = _started(me, campaign=campaigns[me])
        heard = [_peer(n, campaigns=campaigns[n]) for n in ids if n != me]
        if bootstrap.decide(20.0, has_log=False, heard=heard) is Decision.FOUND:
            founders.append(me)
    assert founders == [min(n for n in ids if campaigns[n])]


def test_a_voter_never_heard_from_counts_as_dead_only_once_the_links_settled():
    bootstrap = _started("me", at=10.0)
    voters = ("me", "seen", "never")
    watched = {"seen": True}
    assert bootstrap.dead_members(10.0 + WAIT + SETTLE_S, voters, watched) == []  # not yet: "never" may still call
    assert bootstrap.dead_members(10.0 + WAIT + SETTLE_S + 0.01, voters, watched) == ["never"]
    # a voter the detector watches is dead when the detector says so, settled or not
    assert bootstrap.dead_members(10.5, voters, {"seen": False}) == ["seen"]
    assert bootstrap.dead_members(30.0, voters, {"seen": False, "never": True}) == ["seen"]
    assert "me" not in bootstrap.dead_members(30.0, voters, {"me": False})  # never itself


@pytest.mark.parametrize("start", [0.0, 5.0, 1234.5])
def test_settled_counts_from_discovery_start(start):
    bootstrap = _started("me", at=start)
    assert not bootstrap.settled(start + WAIT + SETTLE_S)
    assert bootstrap.settled(start + WAIT + SETTLE_S + 1e-6)
