"""Failover benchmark: SIGKILL a stage's or the coordinator's process mid-generation on a
local 3-node torch mesh and measure recovery (death -> next token), check the answer
is token for token the fault-free one, and compare tokens/s of the faulted runs with
fault-free runs measured in the same invocation.

    python bench/failover.py [--trials 5] [--max-tokens 40]

One cluster serves every trial: the killed node is restarted and rejoins between trials.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

from mesh.http.client import stream_chat
from mesh.testing.kills import KillFault, stream_with_faults
from mesh.testing.launcher import LocalCluster

PROMPTS = [
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "List three uses of a paperclip.",
    "Describe a sunrise over the mountains.",
]
KINDS = [("stage", 0), ("stage", 1), ("stage", 2), ("coordinator", None)]


async def restore(cluster: LocalCluster) -> dict:
    for node in cluster.nodes:
        if not node.alive:
            cluster.restart(node.index)
    return await cluster.wait_ready(timeout=180, stages=len(cluster.nodes))


async def main(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    cluster = LocalCluster(n=3, backend="torch", extra_args=["--audit-rate", "0"] if args.no_audit else [])
    results: dict[str, dict] = {}
    with cluster:
        view = await cluster.wait_ready(timeout=180, stages=3)
        reference: dict[tuple[str, float, int], tuple[list[int], float]] = {}
        for trial in range(args.trials):
            for kind, stage in KINDS:
                name = kind if stage is None else f"stage{stage}"
                prompt = PROMPTS[rng.randrange(len(PROMPTS))]
                temperature = 0.0 if trial % 2 == 0 else 0.8
                seed = rng.randrange(1 << 16)
                key = (prompt, temperature, seed)
                view = await restore(cluster)
                if key not in reference:  # the fault-free run on the same cluster
                    t0 = time.perf_counter()
                    clean = await stream_chat(cluster.nodes[0].api, prompt, max_tokens=args.max_tokens,
                                              temperature=temperature, seed=seed)
                    reference[key] = (clean.token_ids, len(clean.token_ids) / (time.perf_counter() - t0))
                expected, clean_tps = reference[key]
                after = rng.randint(1, max(1, len(expected) - 2))
                started = time.perf_counter()
                result, failovers, _ = await asyncio.wait_for(
                    stream_with_faults(cluster, view, prompt, [KillFault(kind, after, stage)],
                                       max_tokens=args.max_tokens, temperature=temperature, seed=seed), 300)
                wall = time.perf_counter() - started
                entry = results.setdefault(name, {"trials": 0, "identical": 0, "recovery_s": [], "tps_ratio": []})
                entry["trials"] += 1
                entry["identical"] += int(result.token_ids == expected)
                rec = failovers[0].get("recovery_s") if failovers else None
                if rec is not None:
                    entry["recovery_s"].append(rec)
                # tokens per second of the whole request (time to first token included), both runs
                entry["tps_ratio"].append(len(result.token_ids) / wall / clean_tps if clean_tps else 0.0)
                print(f"{name} trial {trial}: identical={result.token_ids == expected} after={after} "
                      f"recovery={rec if rec is None else round(rec, 3)}", file=sys.stderr)
    out = {"bench": "failover", "nodes": 3, "backend": "torch", "max_tokens": args.max_tokens,
           "trials_per_kind": args.trials, "kinds": {}}
    all_rec = []
    for name, e in results.items():
        rec = e["recovery_s"]
        all_rec += rec
        out["kinds"][name] = {
            "trials": e["trials"], "identical": e["identical"],
            "recovery_median_s": round(statistics.median(rec), 3) if rec else None,
            "recovery_max_s": round(max(rec), 3) if rec else None,
            "tokens_per_s_ratio_vs_fault_free": round(statistics.median(e["tps_ratio"]), 3),
        }
    out["recovery_median_s"] = round(statistics.median(all_rec), 3) if all_rec else None
    out["recovery_max_s"] = round(max(all_rec), 3) if all_rec else None
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="trials per fault kind (default 5)")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--no-audit", action="store_true", help="run the nodes with --audit-rate 0")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
