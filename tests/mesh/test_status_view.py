"""`mesh status` shows each node's speed score, where it came from, and the score the plan
uses when nodes share a host (pure: the table of a given /v1/cluster object)."""

from __future__ import annotations

from mesh.commands.status import print_view

SOURCE = "measured: torch/float32 decode of 8 copies of the model's layer (108 MiB), best of 6 steps"


def _node(i: int, speed: float, plan_speed: float, host: str, source: str = SOURCE) -> dict:
    return {"id": f"{i:016x}", "name": f"node{i}", "member": True, "voter": True, "backend": "torch",
            "free_memory": 1 << 30, "speed": speed, "plan_speed": plan_speed, "host": host, "speed_source": source,
            "state": "alive", "roles": []}


def test_status_shows_each_score_its_source_and_the_shared_host(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps at the terminal width
    view = {"self": f"{0:016x}", "model": "smollm2-135m", "coordinator": f"{0:016x}", "term": 3,
            "nodes": [_node(0, 983.0, 983.0, "h1"), _node(1, 402.0, 983.0, "h1"),
                      _node(2, 1.0, 1.0, "h2", "configured (--speed)")], "plan": None}
    print_view(view, "http://127.0.0.1:1")
    out = capsys.readouterr().out
    assert "score" in out and "983" in out and "402 (plan: 983)" in out
    assert f"score of node0: {SOURCE}; same host as node1" in out
    assert "score of node2: configured (--speed)" in out and "score of node2: configured (--speed);" not in out
