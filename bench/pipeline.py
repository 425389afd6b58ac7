"""Pipeline benchmark: the 3-node mesh on loopback against single-device generation,
measured in one run on the same backend, model and prompt; prints one JSON object.

- decode tokens/s and time to first token of one session on the mesh, and of the
  single-device loop (``kernels.generate``, what `mesh generate` runs) in this process,
  run alternately with the mesh's (idle meanwhile), so both see the same outside load; their ratio
  (goal >= 0.9: the network costs less than 10%);
- total tokens/s with 1, 4 and 8 sessions started together on the mesh, and the
  8-vs-1 ratio (goal >= 3: the stages batch concurrent sessions).

Every figure is the best of ``--repeat`` runs (less sensitive to other load on the
machine). Usage: ``python bench/pipeline.py [--nodes 3] [--max-tokens 64] [--threads N]``.

``--agreement mixed`` measures something else: how often and where the tokens of a
mesh of that backend (mixed: torch and MLX nodes alternate) differ from single-device
torch, for greedy and seeded sampling on the pipeline tests' prompts (48 tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


class SingleDevice:
    """The whole model in this process; ``run()`` is one `mesh generate`-style generation."""

    def __init__(self, model: str, backend: str, max_tokens: int):
        from kernels.config import load_config
        from kernels.generate import GenerationStats, generate
        from kernels.loader import load_stage
        from kernels.stage import StageSpec
        from kernels.tokenizer import Tokenizer
        from mesh import models

        path = models.resolve(model, fetch=True)
        self.tok = Tokenizer.from_model(path)
        self.ids = self.tok.encode(self.tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                                add_generation_prompt=True), add_special_tokens=False)
        self.stage = load_stage(path, StageSpec.full(load_config(path).n_layers), backend=backend)
        self.max_tokens = max_tokens
        self._generate, self._stats = generate, GenerationStats
        self.runs: list[dict] = []
        list(generate(self.stage, self.ids, max_tokens=4, stop_ids=self.tok.eos_token_ids))  # warm-up

    def run(self) -> None:
        stats = self._stats()
        tokens = list(self._generate(self.stage, self.ids, max_tokens=self.max_tokens,
                                     stop_ids=self.tok.eos_token_ids, stats=stats))
        self.runs.append({"tokens": len(tokens), "ttft_s": stats.ttft_s,
                          "decode_tokens_per_s": stats.decode_tokens_per_s})

    def figures(self) -> dict:
        import torch

        return {"decode_tokens_per_s": max(r["decode_tokens_per_s"] for r in self.runs),
                "ttft_s": min(r["ttft_s"] for r in self.runs), "tokens": self.runs[0]["tokens"],
                "runs": len(self.runs), "torch_threads": torch.get_num_threads(), "prompt_tokens": len(self.ids)}


async def mesh_figures(args: argparse.Namespace, single: SingleDevice) -> dict:
    from mesh.http.client import stream_chat
    from mesh.testing.launcher import LocalCluster

    extra = ["--threads", str(args.threads)] if args.threads else []
    cluster = LocalCluster(n=args.nodes, backend=args.backend, model=args.model, extra_args=extra)
    with cluster:
        started = time.perf_counter()
        view = await cluster.wait_ready(timeout=300, stages=args.nodes)
        ready_s = time.perf_counter() - started
        api = cluster.nodes[0].api

        async def one() -> object:
            return await stream_chat(api, PROMPT, max_tokens=args.max_tokens, timeout=600)

        await stream_chat(api, PROMPT, max_tokens=4)  # warm-up
        singles = []
        for _ in range(args.repeat):  # interleaved, so both see the same load from elsewhere
            single.run()
            singles.append(await one())
        out: dict = {
            "decode_tokens_per_s": max(r.decode_tokens_per_s for r in singles),
            "ttft_s": min(r.ttft_s for r in singles),
            "tokens": len(singles[0].token_ids),
            "ready_s": round(ready_s, 2),
            "pipeline": [{"layers": s["layers"], "backend": s["backend"]} for s in view["plan"]["stages"]],
            # each node's speed score at the plan, where it came from, and the one the plan used
            "scores": [{"node": n.get("name"), "speed": n.get("speed"), "plan_speed": n.get("plan_speed"),
                        "source": n.get("speed_source")} for n in view.get("nodes", [])],
            "concurrent": {},
        }
        async def counters() -> list[dict]:
            return [(await _view(node.api) or {}).get("stage", {}) for node in cluster.nodes]

        for n in (1, 4, 8):
            best = None
            for _ in range(args.repeat):
                before = await counters()
                t0 = time.perf_counter()
                results = await asyncio.gather(*(one() for _ in range(n)))
                wall = time.perf_counter() - t0
                after = await counters()
                total = sum(len(r.token_ids) for r in results)
                # steps per forward pass on each node's stage: how well the stages batched
                per_batch = [round((a["steps"] - b["steps"]) / max(1, a["batches"] - b["batches"]), 2)
                             for b, a in zip(before, after) if "steps" in a and "steps" in b]
                fig = {"sessions": n, "tokens": total, "wall_s": round(wall, 3),
                       "total_tokens_per_s": round(total / wall, 2), "steps_per_batch": per_batch}
                if best is None or fig["total_tokens_per_s"] > best["total_tokens_per_s"]:
                    best = fig
            out["concurrent"][str(n)] = best
        stats = []
        for node in cluster.nodes:
            view = await _view(node.api)
            if view:
                stats.append(view.get("stage", {}))
        out["stage_stats"] = stats
    return out


async def _view(api: str) -> dict | None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(api + "/v1/cluster") as resp:
            return await resp.json() if resp.status == 200 else None


def agreement(args: argparse.Namespace) -> dict:
    """Per request: the first token where the mesh differs from single-device torch."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "pipeline"))
    from meshtest import (
        MODES,
        PROMPTS,
        Reference,
        Request,
        ask_all,
        cluster_view,
        run,
        running_cluster,
    )

    from mesh import models

    reference = Reference(models.resolve(args.model, fetch=True))
    requests = [Request(p, t) for t in MODES.values() for p in PROMPTS[:args.prompts]]
    for req in requests:
        reference.tokens(req)
    with running_cluster(args.nodes, backend=args.agreement, ready_timeout=300) as cluster:
        view = run(cluster_view(cluster.nodes[0].api))
        results = []
        for i in range(0, len(requests), args.concurrency):  # a few at a time: MLX on CPU is slow to prefill
            results += run(ask_all(cluster.nodes[0].api, requests[i:i + args.concurrency]))
    rows = []
    for req, res in zip(requests, results):
        want, got = reference.tokens(req), res.token_ids
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if first is None and len(got) != len(want):
            first = min(len(got), len(want))
        rows.append({"prompt": req.prompt, "temperature": req.temperature, "first_difference": first,
                     "tokens": [len(got), len(want)]})
    same = sum(r["first_difference"] is None for r in rows)
    return {"bench": "pipeline-agreement", "backend": args.agreement, "nodes": args.nodes,
            "pipeline": [{"layers": s["layers"], "backend": s["backend"]} for s in view["plan"]["stages"]],
            # each node's speed score at the plan, where it came from, and the one the plan used
            "scores": [{"node": n.get("name"), "speed": n.get("speed"), "plan_speed": n.get("plan_speed"),
                        "source": n.get("speed_source")} for n in view.get("nodes", [])],
            "requests": len(rows), "identical": same,
            "first_16_equal": sum(r["first_difference"] is None or r["first_difference"] >= 16 for r in rows),
            "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--backend", choices=["torch", "mlx"], default="torch")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2, help="runs per figure; the best is kept (default 2)")
    p.add_argument("--threads", type=int, help="pass --threads N to every node (default: the node's choice)")
    p.add_argument("--agreement", choices=["torch", "mlx", "mixed"],
                   help="instead: compare a mesh of this backend with single-device torch, token by token")
    p.add_argument("--prompts", type=int, default=5, help="prompts for --agreement (default 5)")
    p.add_argument("--concurrency", type=int, default=2, help="requests at once for --agreement (default 2)")
    args = p.parse_args()
    if args.agreement:
        print(json.dumps(agreement(args), indent=1))
        return 0
    single_device = SingleDevice(args.model, args.backend, args.max_tokens)
    mesh = asyncio.run(mesh_figures(args, single_device))
    single = single_device.figures()
    c = mesh["concurrent"]
    print(json.dumps({
        "bench": "pipeline",
        "model": args.model,
        "backend": args.backend,
        "nodes": args.nodes,
        "max_tokens": args.max_tokens,
        "prompt": PROMPT,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "single_device": single,
        "mesh": mesh,
        "decode_ratio_mesh_vs_single": round(mesh["decode_tokens_per_s"] / single["decode_tokens_per_s"], 3),
        "ttft_ratio_mesh_vs_single": round(mesh["ttft_s"] / single["ttft_s"], 3),
        "concurrency_gain_8_vs_1": round(c["8"]["total_tokens_per_s"] / c["1"]["total_tokens_per_s"], 3),
        "goals": {"decode_ratio": ">= 0.9", "concurrency_gain_8_vs_1": ">= 3"},
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
