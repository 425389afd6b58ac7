"""Decode speed of the MLX backend (float32 and quant) against the torch backend, same run.

Prints one JSON object: single-session greedy decode tokens/s of each engine (best of
``--reps`` runs of ``--max-tokens`` tokens after a chat prompt, via kernels.generate),
a batched decode rate (``--batch`` sessions per step), and each MLX rate as a ratio
to torch float32 measured in the same run. On Linux MLX runs on the CPU.

    python bench/decode_mlx.py [--max-tokens 32] [--reps 2] [--batch 4] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from kernels.config import load_config  # noqa: E402
from kernels.generate import GenerationStats, generate  # noqa: E402
from kernels.loader import load_stage  # noqa: E402
from kernels.stage import Stage, StageSpec, StepInput  # noqa: E402
from kernels.tokenizer import Tokenizer  # noqa: E402

ENGINES = [("torch", "float32"), ("mlx", "float32"), ("mlx", "quant")]
PROMPT = "Explain in one sentence what a CPU does."


def single_rate(stage: Stage, ids: list[int], n: int, reps: int) -> float:
    best = 0.0
    for _ in range(reps):
        stats = GenerationStats()
        for _ in generate(stage, ids, max_tokens=n, stop_ids=[], stats=stats):
            pass
        best = max(best, stats.decode_tokens_per_s)
    return best


def batched_rate(stage: Stage, ids: list[int], batch: int, n: int) -> float:
    """Tokens/s summed over ``batch`` sessions decoding together, one forward per step."""
    sessions = [f"bench-{i}" for i in range(batch)]
    prompt = np.asarray(ids, dtype=np.int64)
    logits = stage.forward([StepInput(s, 0, tokens=prompt) for s in sessions])
    pos = len(ids)
    t = time.perf_counter()
    for _ in range(n):
        tokens = [int(np.argmax(row[-1])) for row in logits]
        logits = stage.forward([StepInput(s, pos, tokens=np.array([tok])) for s, tok in zip(sessions, tokens)])
        pos += 1
    elapsed = time.perf_counter() - t
    for s in sessions:
        stage.free(s)
    return batch * n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: smollm2-135m)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    if args.model is None:
        from mesh import models

        args.model = str(models.resolve(models.DEFAULT_MODEL, fetch=True))
    tok = Tokenizer.from_model(args.model)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    spec = StageSpec.full(load_config(args.model).n_layers)

    results = {}
    for backend, mode in ENGINES:
        stage = load_stage(args.model, spec, backend, mode)
        results[f"{backend}_{mode}"] = {
            "decode_tokens_per_s": round(single_rate(stage, ids, args.max_tokens, args.reps), 2),
            f"batch{args.batch}_tokens_per_s": round(batched_rate(stage, ids, args.batch, args.max_tokens // 2), 2),
            "param_bytes": stage.param_bytes,
        }
        del stage
    base = results["torch_float32"]
    for name, r in results.items():
        if name != "torch_float32":
            r["ratio_vs_torch_float32"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3)
            key = f"batch{args.batch}_tokens_per_s"
            r[f"batch{args.batch}_ratio_vs_torch_float32"] = round(r[key] / base[key], 3)
    print(json.dumps({
        "bench": "decode_mlx",
        "model": Path(args.model).name,
        "machine": platform.machine(),
        "prompt_tokens": len(ids),
        "max_tokens": args.max_tokens,
        "engines": results,
    }, indent=2))


if __name__ == "__main__":
    main()
