"""Cluster figures with real `python -m mesh join` processes: form, detect a kill, re-elect.

    python bench/cluster.py [--runs 10] [--loopback]

Each run starts 3 fresh nodes (namespaces on a bridge, discovery by mDNS alone; or
loopback with --loopback / where namespaces are refused), then SIGKILLs the coordinator:
- form_s: from the last node's `cluster.started` log line to all three reporting the
  same coordinator, term and 3 voters (process start-up before that is reported apart);
- detect_s: from the kill to both survivors reporting the killed node `dead`;
- reelect_s: from the kill to both survivors naming the same new coordinator.
Baseline measured in the same run: the same three figures for 3 ClusterServices in one
process over the in-memory transport (no processes, no sockets); ratios = real / baseline.
Prints one JSON object (medians, maxima, all samples).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "cluster")]

from join_lab import JoinLab, same_coordinator, state_of  # noqa: E402
from netns import netns_skip_reason  # noqa: E402


def real_run(netns: bool) -> dict[str, float]:
    with JoinLab(3, netns=netns) as lab:
        t0 = time.time()
        lab.start_all()
        started = lab.wait_started(range(3), 180)
        coord, _ = lab.wait(lambda: lab.agreed(range(3)), 30, "3 nodes to agree", every=0.02)
        formed = time.time()
        k = lab.ids.index(coord)
        rest = [i for i in range(3) if i != k]
        killed = lab.kill(k)
        detect = reelect = None
        deadline = time.monotonic() + 15
        while (detect is None or reelect is None) and time.monotonic() < deadline:
            views = lab.views(rest)
            now = time.time()
            if detect is None and all(state_of(v, coord) == "dead" for v in views):
                detect = now - killed
            if reelect is None and same_coordinator(lab, rest, not_in=[coord]):
                reelect = now - killed
            time.sleep(0.02)
        if detect is None or reelect is None:
            raise SystemExit(f"no detection/re-election within 15s: {views}")
        return {"startup_s": started - t0, "form_s": formed - started, "detect_s": detect, "reelect_s": reelect}


async def memory_run() -> dict[str, float]:
    from actors import ActorSystem, MemoryNetwork, NodeIdentity

    from mesh.cluster.service import ClusterService

    net = MemoryNetwork()
    services = []
    for i in range(3):
        system = ActorSystem(NodeIdentity.generate(), b"bench-secret-bench", net.transport(f"h{i}"))
        await system.start(f"h{i}", 7000)
        services.append(ClusterService(system, static_peers=[f"h{j}:7000" for j in range(3) if j != i]))

    async def until(pred, timeout: float) -> float:  # type: ignore[no-untyped-def]
        t = time.monotonic()
        while not pred():
            if time.monotonic() - t > timeout:
                raise SystemExit("in-memory baseline did not converge")
            await asyncio.sleep(0.01)
        return time.monotonic() - t

    def agreed(group) -> bool:  # type: ignore[no-untyped-def]
        views = {(s.coordinator, s.term) for s in group}
        return len(views) == 1 and None not in next(iter(views)) and all(len(s.election.voters) == 3 for s in group)

    for s in services:
        await s.start()
    try:
        form = await until(lambda: agreed(services), 20)
        leader = next(s for s in services if s.is_coordinator)
        rest = [s for s in services if s is not leader]
        net.crash(f"h{services.index(leader)}")
        await leader.stop()
        t = time.monotonic()
        detect = reelect = None
        while detect is None or reelect is None:
            now = time.monotonic() - t
            if now > 10:
                raise SystemExit("in-memory baseline did not re-elect")
            if detect is None and all(next((m.state for m in s.members() if m.node_id == leader.node_id), "")
                                      == "dead" for s in rest):
                detect = now
            if reelect is None and len({(s.coordinator, s.term) for s in rest}) == 1 \
                    and rest[0].coordinator not in (None, leader.node_id):
                reelect = now
            await asyncio.sleep(0.01)
        return {"form_s": form, "detect_s": detect, "reelect_s": reelect}
    finally:
        for s in services:
            await s.stop()
            await s.system.stop()


def summary(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = samples[0].keys()
    return {k: {"median": round(statistics.median(s[k] for s in samples), 3),
                "max": round(max(s[k] for s in samples), 3)} for k in keys}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--loopback", action="store_true", help="nodes on 127.0.0.1 instead of namespaces")
    a = p.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # stdout is for the JSON
    reason = netns_skip_reason()
    netns = not a.loopback and reason is None
    real, base = [], []
    for i in range(a.runs):
        real.append(real_run(netns))
        base.append(asyncio.run(memory_run()))
        print(f"run {i + 1}/{a.runs}: {json.dumps({k: round(v, 3) for k, v in real[-1].items()})}", file=sys.stderr)
    r, b = summary(real), summary(base)
    print(json.dumps({
        "variant": "netns (one namespace per node, mDNS only)" if netns else
                   f"loopback 127.0.0.1 ({'--loopback' if a.loopback else reason})",
        "runs": a.runs,
        "processes": r,
        "in_memory_baseline": b,
        "ratio_median": {k: round(r[k]["median"] / b[k]["median"], 2) for k in b},
        "samples": [{k: round(v, 3) for k, v in s.items()} for s in real],
    }, indent=1))


if __name__ == "__main__":
    main()
