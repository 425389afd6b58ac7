"""`mesh run` and `mesh status` against the 3-node mesh, by --api and by mDNS on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from api_settings import MAX_TOKENS, PROMPT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def mesh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True, text=True, timeout=120)


def test_run_with_api_matches_generate(mesh3, reference):
    out = mesh("run", PROMPT, "--api", mesh3.nodes[1].api, "--max-tokens", str(MAX_TOKENS), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == reference["token_ids"]
    assert result["text"] == reference["text"]


def test_run_streams_text(mesh3, reference):
    out = mesh("run", PROMPT, "--api", mesh3.nodes[0].api, "--max-tokens", str(MAX_TOKENS))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == reference["text"].strip()
    assert "tokens/s" in out.stderr


def test_run_finds_the_cluster_by_mdns(mesh3):
    # Other meshes may share this loopback (parallel test runs): pick ours by node id.
    ours = {n["id"]: n for n in mesh3.view["nodes"]}
    by_name = {n["name"]: n["id"] for n in ours.values()}
    # Only signed announcements of trusted nodes are used: node0 is pinned, node1 and node2 are
    # the members it reports.
    trust = ["--trust", by_name["node0"]]
    out = mesh("run", "Say hello.", "--interface", "127.0.0.1", *trust, "--node", by_name["node1"][:12],
               "--max-tokens", "4", "--json")
    if out.returncode != 0 and "NoApiFound" in out.stderr:
        pytest.skip("no multicast on this loopback interface: " + out.stderr.strip())
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["api"] == mesh3.nodes[1].api
    assert result["token_ids"]
    out = mesh("run", "Say hello.", "--interface", "127.0.0.1", *trust, "--node", by_name["node2"][:12],
               "--max-tokens", "4")
    assert out.returncode == 2 and "require a key" in out.stderr  # node2 needs --api-key
    out = mesh("run", "Say hello.", "--interface", "127.0.0.1", "--node", by_name["node1"][:12], "--max-tokens", "4")
    assert out.returncode == 2 and "none from a node this machine trusts" in out.stderr  # nothing pinned


def test_status_json_and_table(mesh3):
    out = mesh("status", "--api", mesh3.nodes[0].api, "--json")
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    assert {"self", "coordinator", "term", "nodes"} <= set(view)
    assert len(view["nodes"]) == 3
    assert all(n["member"] and n["voter"] for n in view["nodes"])  # the keys, admitted (3 seats: all vote)
    assert view["admission"] == {"mode": "auto", "pending": []}
    assert [n["speed"] for n in view["nodes"]] == [1.0] * 3  # --speed replaces the measured score
    assert [n["speed_source"] for n in view["nodes"]] == ["configured (--speed)"] * 3
    assert [n["plan_speed"] for n in view["nodes"]] == [1.0] * 3
    assert len({n["host"] for n in view["nodes"]}) == 1 and view["nodes"][0]["host"]  # one machine
    assert [s["layers"][1] - s["layers"][0] for s in view["plan"]["stages"]] == [10, 10, 10]
    out = mesh("status", "--api", mesh3.nodes[0].api)
    assert out.returncode == 0, out.stderr
    for word in ("node0", "node1", "node2", "coordinator", "stage 0", "stage 2", "term", "voter", "score",
                 "score of node0: configured (--speed); same host as node"):
        assert word in out.stdout


def test_status_unreachable_is_one_line(mesh3):
    out = mesh("status", "--api", "http://127.0.0.1:9")
    assert out.returncode == 2
    assert out.stderr.startswith("error: StatusUnavailable") and "Traceback" not in out.stderr
