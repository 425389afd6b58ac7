"""Verification: what it costs and what it catches, measured in one run.

Prints one JSON object:

- ``mesh``: decode tokens/s of a 3-node mesh of real `mesh join` processes with
  verification on (audit rate 0.2) and off (MESH_VERIFY=off: no commitments, no
  audits), runs alternated, and the ratio on/off;
- ``commitment_us``: commitment cost per token per stage (digest of the output where
  the stage did not already compute it, the Merkle leaf, the amortized signature);
- ``honest``: per honest cross-backend pair, audited stage-steps, our audit's false
  positive rate and the canonical-grid hash mismatch rate, and the largest honest
  per-row relative L2 error;
- ``detection``: per fault mode at stage 1, the share of its steps whose audit fails
  and, over 20 seeded audit schedules at rate 0.2, how many flag the node within 50
  generated tokens (first failing selected step + one commitment chunk + escalation).

    python bench/verify.py [--prompts 8] [--tokens 42] [--mesh-tokens 64] [--quick] [--mesh-only]
    python bench/verify.py --model gemma-3-270m --honest-only   # one family's honest table

``--model`` runs the honest table and the detection on another registry model (a base
model's prompts are raw text); the mesh part always runs the default model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blake3
import numpy as np

from actors import NodeIdentity
from kernels.digest import tensor_digest
from kernels.sampling import SamplingParams
from kernels.tokenizer import Tokenizer
from mesh import models
from mesh.testing.faults import parse_fault
from mesh.testing.verify_harness import Audit, StageCache, run_pipeline, selected

PROMPTS = [
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Explain recursion to a child.",
    "Why is the sky blue?",
    "Give me a short story about a robot.",
    "Name the planets of the solar system.",
    "What is the difference between a virus and a bacterium?",
    "Describe a sunrise over the mountains.",
]
PAIRS = {  # producer (backend, mode) per stage, auditor backend (None: the other one)
    "torch-f32 <- mlx": ([("torch", "float32")] * 3, "mlx"),
    "mlx-f32 <- torch-f32": ([("mlx", "float32")] * 3, "torch"),
    "mlx-quant <- torch-f32": ([("mlx", "quant")] * 3, "torch"),
    "mixed torch/mlx f32+quant <- other backend": ([("torch", "float32"), ("mlx", "quant"), ("torch", "float32")],
                                                   None),
    "torch-quant <- torch-quant": ([("torch", "quant")] * 3, "mlx"),
}
FAULTS = ["tamper:scale=0.01", "noise:sigma=0.01", "stale", "skip-layer:0", "skip-layer:4", "skip-layer:9",
          "corrupt-wire"]


def encode(tok: Tokenizer, prompt: str) -> list[int]:
    """The prompt as a user message through the chat template, or raw text for a base model."""
    if not tok.chat_template:
        return tok.encode_prompt(prompt)
    return tok.encode_chat([{"role": "user", "content": prompt}])


def honest_table(cache: StageCache, prompts: list[list[int]], tokens: int) -> dict:
    sampling = SamplingParams(temperature=0.8, seed=11)
    rng = np.random.default_rng(5)
    table = {}
    for name, (configs, auditor) in PAIRS.items():
        audited = fails = grid_miss = 0
        worst = 0.0
        for i, ids in enumerate(prompts):
            _, traces = run_pipeline(cache, ids, configs, max_tokens=tokens, sampling=sampling, session=f"h{i}")
            for trace in traces:
                other = auditor or ("mlx" if trace.backend == "torch" else "torch")
                audit = Audit(cache, trace, other, sampling)
                steps = sorted(trace.records)
                try:
                    at = 0  # every step audited, in passes of 1..6 steps as the auditor gathers them
                    while at < len(steps):
                        size = int(rng.integers(1, 7))
                        for v in audit.check_many(steps[at:at + size]).values():
                            audited += 1
                            fails += not v.ok
                            grid_miss += not v.grid_match
                            worst = max(worst, v.max_row_rel_l2)
                        at += size
                finally:
                    audit.close()
        table[name] = {"audited_stage_steps": audited, "audit_false_positive_rate": fails / audited,
                       "grid_hash_mismatch_rate": grid_miss / audited, "max_row_rel_l2": worst}
    return table


def detection(cache: StageCache, prompts: list[list[int]], tokens: int = 50, runs: int = 20,
              rate: float = 0.2, chunk: int = 8) -> dict:
    greedy = SamplingParams()
    out = {}
    for spec in FAULTS:
        fault = parse_fault("stage=1:" + spec)
        if fault.kind == "corrupt-wire":  # the next stage's digest check: every corrupted step, at once
            out[spec] = {"caught_on_same_step": True, "runs_flagged_within_50": runs, "runs": runs,
                         "how": "receiver digest check + 2 signed reports (tests/verify/test_ledger.py)"}
            continue
        per_prompt = []
        step_fail = step_total = 0
        for i, ids in enumerate(prompts):
            _, traces = run_pipeline(cache, ids, [("torch", "float32")] * 3, max_tokens=tokens, sampling=greedy,
                                     fault=fault, session=f"d{i}")
            cheater = traces[1]
            first, second = Audit(cache, cheater, "mlx", greedy), Audit(cache, cheater, "torch", greedy, key="2nd")
            try:
                verdicts = {s: first.check(s) for s in sorted(cheater.records)}
                failing = [s for s, v in verdicts.items() if not v.ok]
                # the escalation re-checks the same step on another auditor
                confirmed = [s for s in failing[:12] if not second.check(s).ok]
            finally:
                first.close()
                second.close()
            step_fail += len(failing)
            step_total += len(verdicts)
            per_prompt.append((cheater, failing, set(confirmed)))
        flagged_at = []
        for seed in range(runs):
            cheater, failing, confirmed = per_prompt[seed % len(per_prompt)]
            secret = blake3.blake3(f"bench beacon {seed}".encode()).digest()
            picks = [s for s in failing if selected(secret, cheater.records[s], rate)]
            hit = next((s for s in picks if s in confirmed or s > max(confirmed, default=-1)), None)
            flagged_at.append(None if hit is None else hit + chunk)
        within = [t for t in flagged_at if t is not None and t <= tokens]
        out[spec] = {"failing_audit_share": step_fail / step_total, "runs": runs,
                     "runs_flagged_within_50": len(within),
                     "median_flag_token": statistics.median(within) if within else None}
    return out


def commitment_cost(n: int = 2000) -> dict:
    from mesh.pipeline.messages import Forward, StageEntry
    from mesh.verify.recorder import StageRecorder

    class Host:
        epoch = (1, 1)
        backend, weight_mode = "torch", "float32"

        def __init__(self, index):
            self.entry = StageEntry(index, "x", 0, 10, "torch")
            self.stage = type("S", (), {"weights_digest": b"w" * 32})()

    out = {}
    for name, width, index in (("hidden_stage", 576, 1), ("head_stage", 49152, 2)):
        rec = StageRecorder(NodeIdentity.generate(), lambda *a: None, lambda: "c", backend="torch", weight_mode="float32",
                            max_sessions=4)
        host = Host(index)
        x = np.ones((1, 576), np.float32)
        y = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
        srcs = [Forward(1, 1, "s", s, 40 + s, "p", tensor_digest(x), hidden=x) for s in range(n)]
        started = time.perf_counter()
        for src in srcs:
            # the hidden stage hands over the digest it already computed for the wire; the head digests logits
            rec.commit(host, src, y, tensor_digest(y) if index == 1 else None, token=3 if index == 2 else -1)
        out[name] = round((time.perf_counter() - started) / n * 1e6, 1)
    return out


def _bootstrap_median(xs: list[float], n: int = 10_000) -> list[float] | None:
    """A 95% bootstrap interval of the median (seeded, so one run prints one answer)."""
    if len(xs) < 2:
        return None
    rng = np.random.default_rng(0)
    medians = np.median(rng.choice(np.asarray(xs), size=(n, len(xs)), replace=True), axis=1)
    return [round(float(q), 4) for q in np.quantile(medians, [0.025, 0.975])]


def _runq(views: list[dict]) -> float:
    """The compute threads' seconds ready to run but waiting for a core, summed over nodes."""
    return sum(v.get("stage", {}).get("runq_s") or 0.0 for v in views)


def _proc_cpu(node) -> float:
    """CPU seconds (user + system) a node's process used so far; 0 where /proc is absent."""
    try:
        fields = Path(f"/proc/{node.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, AttributeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _by_stage(views: list[dict]) -> list[dict]:
    """The nodes' views in stage order."""
    plan = next((v.get("plan") for v in views if v.get("plan")), None) or {}
    order = [s["node"] for s in plan.get("stages", [])]
    return sorted(views, key=lambda v: order.index(v.get("self")) if v.get("self") in order else len(order))


async def _drain(cluster, http, timeout: float = 60.0) -> float:
    """Wait until the coordinator has no audit outstanding; the seconds it took."""
    started = time.perf_counter()
    await asyncio.sleep(0.5)  # the last chunk's commitments reach the coordinator
    quiet = 0
    while time.perf_counter() - started < timeout and quiet < 2:
        _, coordinator = await cluster.statuses(http)
        pending = (coordinator or {}).get("verification", {}).get("audits_pending", 1)
        quiet = quiet + 1 if pending == 0 else 0
        await asyncio.sleep(0.25)
    return time.perf_counter() - started


async def mesh_speed(tokens: int, rounds: int, prompts: list[str], rate: float = 0.2) -> dict:
    """Two 3-node clusters up at once, one with verification and one without; requests
    alternate between them (on, off, off, on, ...) so drift in the machine's speed hits
    both alike. Every node states the same speed score, so both clusters plan 10/10/10
    layers (a score measured while the other nodes start is noisy, and an uneven plan
    would be a difference of its own). After each request the next waits until the
    verifying cluster has no audit outstanding, so one cluster's audits never run
    during the other's request. The ratio is the median of the per-pair ratios."""
    from contextlib import ExitStack

    import aiohttp

    from mesh.http.client import stream_chat
    from mesh.testing.launcher import LocalCluster

    speeds: dict[str, list[float]] = {"on": [], "off": []}
    pairs: list[float] = []
    drains: list[float] = []
    clusters, plans = {}, {}
    with ExitStack() as stack:
        for mode in ("on", "off"):
            os.environ["MESH_VERIFY"] = mode
            clusters[mode] = stack.enter_context(
                LocalCluster(n=3, extra_args=["--audit-rate", str(rate), "--speed", "1"], log_level="warning"))
        os.environ.pop("MESH_VERIFY", None)
        for mode, cluster in clusters.items():
            view = await cluster.wait_ready(timeout=300, stages=3)
            plans[mode] = [s["layers"] for s in view["plan"]["stages"]]
            await stream_chat(cluster.nodes[0].api, "Hello", max_tokens=8)  # warm-up
        async with aiohttp.ClientSession() as http:
            await _drain(clusters["on"], http)
            cpu_before = {mode: [_proc_cpu(n) for n in c.nodes] for mode, c in clusters.items()}
            runq_before = {mode: _runq([await c.status(i, http) or {} for i in range(3)])
                           for mode, c in clusters.items()}
            for r in range(rounds):
                for i, p in enumerate(prompts):
                    order = ("on", "off") if (r + i) % 2 == 0 else ("off", "on")
                    got = {}
                    for mode in order:
                        res = await stream_chat(clusters[mode].nodes[0].api, p, max_tokens=tokens, temperature=0.0)
                        got[mode] = res.decode_tokens_per_s
                        speeds[mode].append(res.decode_tokens_per_s)
                        if mode == "on":
                            drains.append(await _drain(clusters["on"], http))
                        else:
                            await asyncio.sleep(0.5)
                    pairs.append(got["on"] / got["off"])
            # the node processes' CPU over the rounds (their audit processes are separate)
            node_cpu = {mode: [round(_proc_cpu(n) - b, 2) for n, b in zip(c.nodes, cpu_before[mode])]
                        for mode, c in clusters.items()}
            views = [await clusters["on"].status(i, http) or {} for i in range(3)]
            off_views = [await clusters["off"].status(i, http) or {} for i in range(3)]
    verification = views[0].get("verification", {})
    audit_s = sum(v.get("verification", {}).get("local", {}).get("audit_compute_s", 0.0) for v in views)
    stage_s = sum(v.get("stage", {}).get("busy_s", 0.0) for v in views)
    stage_off_s = sum(v.get("stage", {}).get("busy_s", 0.0) for v in off_views)
    passes = sum(v.get("verification", {}).get("local", {}).get("audit_passes", 0) for v in views)
    on, off = statistics.median(speeds["on"]), statistics.median(speeds["off"])
    ratio = statistics.median(pairs)
    return {"decode_tokens_per_s_on": on, "decode_tokens_per_s_off": off, "ratio_on_off": ratio,
            "slowdown_pct": round((1 - ratio) * 100, 2), "pairs": len(pairs),
            # the spread of the pairs: on a shared machine one pair says little on its own
            "pair_ratio_quartiles": [round(q, 3) for q in statistics.quantiles(pairs, n=4)] if len(pairs) > 1 else None,
            "ratio_median_ci95": _bootstrap_median(pairs), "ratio_geomean": round(statistics.geometric_mean(pairs), 4),
            "pair_ratios": pairs, "plans": plans,
            # seconds from the end of an answer until its audits are done (the audits' tail, off the critical path)
            "audit_tail_s_median": round(statistics.median(drains), 2) if drains else None,
            "samples": speeds, "audit_cpu_s": round(audit_s, 2), "stage_busy_s": round(stage_s, 2),
            # compute time of the stages themselves, on vs off: whether verification slows the forward passes
            "stage_busy_s_off": round(stage_off_s, 2),
            "stage_busy_s_by_stage": {mode: [round(v.get("stage", {}).get("busy_s", 0.0), 2) for v in _by_stage(vs)]
                                      for mode, vs in (("on", views), ("off", off_views))},
            # of the busy time, the forward passes on the compute thread (wall and CPU); the
            # rest is the wait for the event loop to take the outputs
            "stage_compute_s": {mode: round(sum(v.get("stage", {}).get("compute_s", 0.0) for v in vs), 2)
                                for mode, vs in (("on", views), ("off", off_views))},
            "stage_cpu_s": {mode: round(sum(v.get("stage", {}).get("cpu_s", 0.0) for v in vs), 2)
                            for mode, vs in (("on", views), ("off", off_views))},
            "node_process_cpu_s": node_cpu,
            # the compute threads' seconds ready but waiting for a core, over the rounds
            "stage_runq_s": {mode: round(_runq(vs) - runq_before[mode], 2)
                             for mode, vs in (("on", views), ("off", off_views))}, "audit_passes": passes,
            "verification_view": {k: v for k, v in verification.items() if k not in ("flagged_nodes", "local")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48, help="tokens per prompt in the honest table")
    ap.add_argument("--detect-prompts", type=int, default=4)
    ap.add_argument("--mesh-tokens", type=int, default=64)
    ap.add_argument("--mesh-rounds", type=int, default=2)
    ap.add_argument("--audit-rate", type=float, default=0.2, help="audit rate of the mesh runs with verification on")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--skip-mesh", action="store_true")
    ap.add_argument("--mesh-only", action="store_true", help="only the on/off decode speed of the mesh")
    ap.add_argument("--honest-only", action="store_true", help="only the honest table (no mesh, no detection)")
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="registry model of the honest table and detection")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.tokens, args.detect_prompts, args.mesh_tokens, args.mesh_rounds = 1, 8, 1, 24, 1
    path = models.resolve(args.model, fetch=True)
    tok = Tokenizer.from_model(path)
    cache = StageCache(path)
    started = time.perf_counter()
    result = {"model": args.model}
    if not args.honest_only:
        result["commitment_us_per_token_per_stage"] = commitment_cost()
    if not (args.skip_mesh or args.honest_only):
        result["mesh"] = asyncio.run(mesh_speed(args.mesh_tokens, args.mesh_rounds, PROMPTS[:3], args.audit_rate))
    if args.mesh_only:
        print(json.dumps(result, indent=2))
        return
    ids = [encode(tok, p) for p in PROMPTS[:args.prompts]]
    result["honest"] = honest_table(cache, ids, args.tokens)
    result["honest_audited_stage_steps_total"] = sum(v["audited_stage_steps"] for v in result["honest"].values())
    if args.honest_only:
        result["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result, indent=2))
        return
    result["detection"] = detection(cache, [encode(tok, p) for p in PROMPTS[:args.detect_prompts]])
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
