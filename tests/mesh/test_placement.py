"""Who the coordinator may give layers to (mesh.node.placeable): a heartbeat is a claim
any key holding the cluster secret can make; only admitted members (voters and learners)
are placed."""

from __future__ import annotations

from mesh.cluster.service import Member
from mesh.node import placeable


def member(node_id: str, *, admitted: bool = True, voter: bool = True, state: str = "alive", backend: str = "torch",
           memory: int = 8 << 30, speed: float = 1.0) -> Member:
    return Member(node_id, backend=backend, free_memory=memory, state=state, voter=voter and admitted,
                  member=admitted, speed=speed)


def test_a_non_member_heartbeating_a_big_fast_machine_gets_no_layers() -> None:
    # found by tests/inproc/test_fuzz_rogue.py: it got 27 of 30 layers, and the plan waited for it forever
    rogue = member("rogue", admitted=False, memory=64 << 30, speed=100.0)
    placed = placeable([member("a"), member("b"), rogue])
    assert [c.node_id for c in placed] == ["a", "b"]


def test_a_learner_is_placed_like_a_voter() -> None:
    # admitted beyond the voter cap: no vote, but its memory counts for the model
    placed = placeable([member("a"), member("b"), member("c"), member("d", voter=False)])
    assert [c.node_id for c in placed] == ["a", "b", "c", "d"]


def test_dead_left_and_backendless_members_are_not_placed_but_suspects_keep_their_place() -> None:
    placed = placeable([member("a", state="suspect"), member("b", state="dead"), member("c", state="left"),
                        member("d", backend="")])
    assert [c.node_id for c in placed] == ["a"]
