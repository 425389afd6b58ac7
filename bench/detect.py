"""Detection on a real cluster: is every cheat caught, and does the answer still finish?

For each fault mode at stage 1 of a 3-node torch mesh of real `mesh join` processes
(audit rate 0.2), N seeded runs, each on a fresh cluster: one greedy chat answer of 50
tokens is streamed and the client notes the wall-clock time of every streamed chunk.
A run counts as caught when the node holding stage 1 was flagged before the answer's
last token arrived (the flag's ``at`` against the chunk times gives the token index)
and the stream's final pipeline no longer holds it (evicted). For corrupt-wire, the flag's
reports must be the cheater's first forwards, each reported by the next stage on the
step it arrived (never computed on).

Runs are seeded: MESH_AUDIT_SEED (the coordinator's beacon secret per term), the
prompt (cycled from PROMPTS) and, for skip-layer, the skipped layer. The audit
schedule also hashes each step's session id and digests, so a seed fixes the secret,
not the whole schedule.

    python bench/detect.py [--runs 20] [--modes tamper,noise,stale,skip-layer,corrupt-wire,
                                                  lie-digest,refuse-fetch,withhold]
                           [--tokens 50] [--seed 0] [--keep-logs]

Prints one JSON object. Runs are sequential (one cluster at a time); the logs of a
run that fails or misses are kept and named in its record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp

from mesh import models
from mesh.http.client import StreamResult, stream_chat
from mesh.errors import MeshError
from mesh.testing.launcher import LocalCluster
from mesh.testing.faults import verify_args

STAGE = 1  # the cheating stage: it sends hidden states and receives them (skip-layer, stale need both)
# skip-layer:L takes L = seed mod 10. The fault is fixed before the plan exists; the planner
# gives stage 1 between 1 and 20 of the 30 layers here (10 most often), and a short stage
# clamps L to its last layer. Each record names the absolute layer skipped.
SKIP_LAYERS = 10
MODES = {
    "tamper": "tamper:scale=0.01",
    "noise": "noise:sigma=0.01",
    "stale": "stale",
    "skip-layer": "skip-layer:{layer}",
    "corrupt-wire": "corrupt-wire",
    "lie-digest": "lie-digest",
    "refuse-fetch": "refuse-fetch",
    "withhold": "withhold",
}
PROMPTS = [
    "Explain how a bicycle stays upright.",
    "Describe the water cycle step by step.",
    "Why do cats purr? Give a few reasons.",
    "Write a short story about a lighthouse keeper.",
    "How does a refrigerator keep food cold?",
    "Explain what a prime number is, with examples.",
    "Describe a walk through a busy city market.",
    "What makes bread rise when it is baked?",
    "Give advice to someone learning to cook.",
    "Explain how the seasons change on Earth.",
]


def fault_spec(mode: str, seed: int) -> str:
    return MODES[mode].format(layer=seed % SKIP_LAYERS)


@contextmanager
def audit_seed(seed: int) -> Iterator[None]:
    """MESH_AUDIT_SEED for the nodes started inside (they inherit os.environ); restored after."""
    before = os.environ.get("MESH_AUDIT_SEED")
    os.environ["MESH_AUDIT_SEED"] = str(seed)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MESH_AUDIT_SEED", None)
        else:
            os.environ["MESH_AUDIT_SEED"] = before


async def run_once(mode: str, seed: int, *, tokens: int = 50, audit_rate: float = 0.2, timeout: float = 300.0,
                   settle_s: float = 30.0, keep_logs: bool = False, log_level: str = "warning") -> dict:
    """One seeded run of ``mode`` on a fresh 3-node cluster; returns its record."""
    spec = fault_spec(mode, seed)
    prompt = PROMPTS[seed % len(PROMPTS)]
    record: dict = {"mode": mode, "seed": seed, "spec": spec, "prompt": prompt}
    started = time.perf_counter()
    cluster = LocalCluster(n=3, backend="torch", log_level=log_level, keep_dir=keep_logs,
                           extra_args=["--weight-mode", "float32",
                                       *verify_args(audit_rate, [f"stage={STAGE}:{spec}"])])
    with audit_seed(seed), cluster:
        try:
            view = await cluster.wait_ready(timeout=timeout, stages=3)
            stages = view["plan"]["stages"]
            cheater, receiver = stages[STAGE]["node"], stages[STAGE + 1]["node"]
            record.update(cheater=cheater, layers=stages[STAGE]["layers"], startup_s=_since(started))
            if mode == "skip-layer":
                start, end = stages[STAGE]["layers"]
                record["skipped_layer"] = start + min(seed % SKIP_LAYERS, end - start - 1)
            serving = next(n for n in cluster.nodes if n.node_id != cheater)
            arrivals: list[tuple[float, int]] = []  # (time.time(), tokens streamed so far)
            streaming, began_at = time.perf_counter(), time.time()
            result = await stream_chat(serving.api, prompt, max_tokens=tokens, temperature=0.0, timeout=timeout,
                                       on_tokens=lambda n: arrivals.append((time.time(), n)))
            ended_at = time.time()
            record["stream_s"] = _since(streaming)
            views = await _settled_views(cluster, cheater, settle_s)
        except (MeshError, TimeoutError, aiohttp.ClientError, KeyError, IndexError) as exc:
            record.update(error=f"{type(exc).__name__}: {exc}", seconds=_since(started), logs=str(cluster.workdir))
            cluster.keep_dir = True
            return record
        record.update(_judge(result, arrivals, (began_at, ended_at), views, cheater, receiver, tokens))
        if mode == "corrupt-wire":  # caught by the chain, on the step: not later by an audit
            record["caught"] = record["caught"] and record.get("caught_same_step", False)
        record["seconds"] = _since(started)
        if not (record["caught"] and record["completed"]):
            cluster.keep_dir = True
            record["logs"] = str(cluster.workdir)
    return record


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


async def _settled_views(cluster: LocalCluster, cheater: str, settle_s: float) -> list[dict]:
    """Every node's /v1/cluster once the cheater is flagged and out of a ready plan, or no
    audit is pending any more (the last audits may finish after the answer)."""
    deadline = time.monotonic() + settle_s
    async with aiohttp.ClientSession() as http:
        while True:
            views = [v for v in [await cluster.status(n.index, http) for n in cluster.nodes] if v]
            done = any(_flag_of(v, cheater) and _evicted(v, cheater) for v in views) or (
                views and all(not (v.get("verification") or {}).get("audits_pending") for v in views)
                and not any(_flag_of(v, cheater) for v in views))
            if done or time.monotonic() > deadline:
                return views
            await asyncio.sleep(0.5)


def _flag_of(view: dict, node: str) -> dict | None:
    flags = (view.get("verification") or {}).get("flagged_nodes") or []
    return next((f for f in flags if f["node"] == node), None)


def _evicted(view: dict, node: str) -> bool:
    plan = view.get("plan") or {}
    return bool(plan.get("ready")) and node not in [s["node"] for s in plan.get("stages", [])]


def _judge(result: StreamResult, arrivals: list[tuple[float, int]], stream: tuple[float, float], views: list[dict],
           cheater: str, receiver: str, tokens: int) -> dict:
    began_at, ended_at = stream
    flags = [f for f in (_flag_of(v, cheater) for v in views) if f is not None]
    flag = min(flags, key=lambda f: f["at"]) if flags else None  # the coordinator's copy is the first
    last_token_at = arrivals[-1][0] if arrivals else ended_at
    during = flag is not None and flag["at"] <= last_token_at  # before the answer's last token arrived
    flag_token = max((n for t, n in arrivals if t < flag["at"]), default=0) if during else None
    in_stream_plan = cheater in [s["node"] for s in result.mesh.get("pipeline", [])]
    out = {
        "flagged": flag is not None,
        "flag_token": flag_token,
        "flag_s": round(flag["at"] - began_at, 2) if flag is not None else None,  # seconds into the stream
        "flag_after_stream_s": round(flag["at"] - last_token_at, 2) if flag is not None and not during else None,
        "evicted": any(_evicted(v, cheater) for v in views),
        "evicted_in_stream": bool(result.mesh.get("pipeline")) and not in_stream_plan,
        "completed": result.finish_reason in ("length", "stop") and 0 < len(result.token_ids) <= tokens,
        "finish_reason": result.finish_reason,
        "tokens": len(result.token_ids),
        "reason": flag["reason"] if flag is not None else None,
        "audits": max((v["verification"].get("audits", 0) for v in views), default=0),
        "audit_failures": max((v["verification"].get("audit_failures", 0) for v in views), default=0),
    }
    out["caught"] = out["flagged"] and during and out["evicted_in_stream"] and flag_token <= tokens
    evidence = (flag or {}).get("evidence") or {}
    if evidence.get("audits"):
        out["failed_steps"] = [a["step"] for a in evidence["audits"]]
    if "reports" in evidence:
        out.update(_wire(evidence["reports"], views, receiver))
    return out


def _wire(reports: list[dict], views: list[dict], receiver: str) -> dict:
    """The next stage reported the cheater's first forwards, each on the step it arrived."""
    mismatches = next(((v.get("stage") or {}).get("digest_mismatches", 0) for v in views
                       if v.get("self") == receiver), 0)
    steps = [r["step"] for r in reports]
    same_step = (steps == list(range(len(reports))) and all(r["reporter"] == receiver for r in reports)
                 and all(r["claimed"] != r["actual"] for r in reports) and mismatches >= len(reports))
    return {"wire_report_steps": steps, "receiver_digest_mismatches": mismatches, "caught_same_step": same_step}


def summarize(records: list[dict], seconds: float) -> dict:
    runs = len(records)
    flag_tokens = [r["flag_token"] for r in records if r.get("flag_token") is not None]
    flag_s = [r["flag_s"] for r in records if r.get("flag_s") is not None]
    caught = sum(bool(r.get("caught")) for r in records)
    out = {
        "runs": runs,
        "flagged_within_50": caught,
        "flagged": sum(bool(r.get("flagged")) for r in records),
        "evicted": sum(bool(r.get("evicted")) for r in records),
        "completed": sum(bool(r.get("completed")) for r in records),
        "errors": sum("error" in r for r in records),
        "goal_met": caught >= math.ceil(0.95 * runs) and all(r.get("completed") for r in records),
        "flag_token_median": statistics.median(flag_tokens) if flag_tokens else None,
        "flag_token_max": max(flag_tokens) if flag_tokens else None,
        "flag_s_median": statistics.median(flag_s) if flag_s else None,  # seconds from the request to the flag
        "flag_s_max": max(flag_s) if flag_s else None,
        "seconds": round(seconds, 1),
        "seconds_per_run_median": statistics.median(r["seconds"] for r in records) if records else None,
    }
    if any("caught_same_step" in r for r in records):
        out["caught_same_step"] = sum(bool(r.get("caught_same_step")) for r in records)
    out["runs_detail"] = records
    return out


async def main(args: argparse.Namespace) -> dict:
    models.resolve(models.DEFAULT_MODEL, fetch=True)  # once here, not in every node
    modes: dict[str, dict] = {}
    for mode in args.modes:
        mode_started, records = time.perf_counter(), []
        for i in range(args.runs):
            rec = await run_once(mode, args.seed + i, tokens=args.tokens, audit_rate=args.audit_rate,
                                 keep_logs=args.keep_logs, log_level=args.log_level)
            records.append(rec)
            print(json.dumps({k: rec.get(k) for k in ("mode", "seed", "spec", "caught", "flag_token", "completed",
                                                      "seconds", "error", "logs") if k in rec}), file=sys.stderr)
        modes[mode] = summarize(records, time.perf_counter() - mode_started)
    every = [r for m in modes.values() for r in m["runs_detail"]]
    return {
        "bench": "detect", "nodes": 3, "backend": "torch", "stage": STAGE, "audit_rate": args.audit_rate,
        "tokens": args.tokens, "modes": modes,
        "totals": {"runs": len(every), "flagged_within_50": sum(bool(r.get("caught")) for r in every),
                   "completed": sum(bool(r.get("completed")) for r in every),
                   "seconds": round(sum(m["seconds"] for m in modes.values()), 1),
                   "goal_met": all(m["goal_met"] for m in modes.values())},
        "command": " ".join(["python", "bench/detect.py", *sys.argv[1:]]),
    }


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode {', '.join(unknown)}; use {', '.join(MODES)}")
    return modes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="seeded runs per mode (default 20)")
    parser.add_argument("--modes", type=_modes, default=list(MODES),
                        help=f"comma-separated fault modes (default all: {','.join(MODES)})")
    parser.add_argument("--tokens", type=int, default=50, help="tokens per answer (default 50)")
    parser.add_argument("--audit-rate", type=float, default=0.2, help="share of stage steps audited (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first run; run i uses seed + i")
    parser.add_argument("--keep-logs", action="store_true", help="keep every run's node logs, not only misses")
    parser.add_argument("--log-level", default="warning", help="the nodes' log level (default warning)")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
