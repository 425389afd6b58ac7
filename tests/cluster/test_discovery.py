"""mDNS discovery for real, in private network namespaces; TXT parsing against garbage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.cluster.discovery import PeerHint, cluster_tag, parse_peer, parse_txt
from mesh.cluster.errors import ClusterError

PROBE = str(Path(__file__).with_name("mdns_probe.py"))
TAG = cluster_tag(b"home")


def test_tag_is_stable_short_and_not_the_secret() -> None:
    assert cluster_tag(b"home") == TAG and len(TAG) == 16
    assert cluster_tag(b"other") != TAG and b"home".hex() not in TAG


def test_parse_txt_accepts_a_good_record() -> None:
    props = {b"id": b"3f2a9c", b"port": b"7946", b"cluster": TAG.encode()}
    assert parse_txt(props, ["10.0.0.5"], TAG) == PeerHint("3f2a9c", "10.0.0.5", 7946)


@given(
    st.dictionaries(
        st.sampled_from([b"id", b"port", b"cluster", b"x"]),
        st.one_of(st.none(), st.binary(max_size=300), st.text(max_size=20).map(str.encode)),
    ),
    st.lists(st.text(max_size=40), max_size=3),
)
def test_parse_txt_never_raises_on_garbage(props: dict[bytes, bytes | None], addrs: list[str]) -> None:
    hint = parse_txt(props, addrs, TAG)
    if hint is not None:
        assert props[b"cluster"] == TAG.encode() and 0 < hint.port < 65536 and hint.node_id.isalnum()


def test_parse_peer() -> None:
    assert parse_peer("192.168.1.20:7946") == ("192.168.1.20", 7946)
    assert parse_peer("[fe80::1]:80") == ("fe80::1", 80)
    for bad in ("nohost", "host:", "host:0", "host:70000", ":80"):
        with pytest.raises(ClusterError, match="host:port"):
            parse_peer(bad)


@pytest.mark.netns
@pytest.mark.slow
def test_three_nodes_find_each_other_and_ignore_junk(lab3) -> None:  # type: ignore[no-untyped-def]
    procs = []
    for i, addr in enumerate(lab3.addresses):
        argv = [sys.executable, PROBE, "--bind", addr, "--id", f"node{i}", "--port", str(7000 + i), "--want", "2"]
        if i == 0:
            argv.append("--garbage")
        procs.append(lab3.popen(i, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=40) for p in procs]
    for i, (out, err) in enumerate(outputs):
        assert procs[i].returncode == 0, f"node{i}: {out} {err[-2000:]}"
        found = {d["id"]: d for d in map(json.loads, (x for x in out.splitlines() if x.startswith("{")))}
        expected = {f"node{j}": {"id": f"node{j}", "host": lab3.addresses[j], "port": 7000 + j}
                    for j in range(3) if j != i}
        assert found == expected
