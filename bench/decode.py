"""Decode speed of the torch backend against transformers, measured in the same run.

Prints one JSON object: decode tokens/s of our float32 and quant stages and of
transformers' ``generate`` (greedy, float32, same GGUF weights and prompt), their
ratios, greedy agreement of quant vs float32 on the first 16 tokens of 5 chat
prompts, and the weight bytes/s our decode achieves as a share of the memory
copy bandwidth measured here.

    python bench/decode.py [--max-tokens 32] [--reps 5] [--quick] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader progress bars

import numpy as np
import torch

from kernels.config import load_config
from kernels.generate import GenerationStats, generate
from kernels.loader import load_stage
from kernels.stage import StageSpec

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
    "List three fruits that are red.",
    "How many legs does a spider have?",
]


def copy_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes moved per second (read + write) by a large numpy copy, best of ``reps``."""
    src = np.ones(nbytes // 8)
    dst = np.zeros_like(src)  # touched: no page faults inside the timing
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def ours_decode_rate(stage, ids: np.ndarray, n: int) -> float:
    stats = GenerationStats()
    for _ in generate(stage, ids, max_tokens=n, stop_ids=[], stats=stats):
        pass
    return stats.decode_tokens_per_s


def hf_decode_rate(model, ids: np.ndarray, n: int) -> float:
    x = torch.tensor(ids)[None]
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        first = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        total = time.perf_counter() - t
    assert out.shape[1] == len(ids) + n
    return (n - 1) / max(total - first, 1e-9)


def greedy(stage, ids: np.ndarray, n: int) -> list[int]:
    return list(generate(stage, ids, max_tokens=n, stop_ids=[]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: smollm2-135m)")
    ap.add_argument("--max-tokens", type=int, default=32, help="decode tokens per timed run")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per engine (best is kept)")
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 rep, 2 agreement prompts")
    args = ap.parse_args()
    n, reps, n_agree = args.max_tokens, args.reps, len(PROMPTS)
    if args.quick:
        n, reps, n_agree = 16, 1, 2
    if args.model:
        path = Path(args.model)
    else:
        from mesh import models

        path = models.resolve(models.DEFAULT_MODEL, fetch=True)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cfg = load_config(path)
    spec = StageSpec.full(cfg.n_layers)
    f32 = load_stage(path, spec, "torch", "float32")  # also sets torch's thread count
    quant = load_stage(path, spec, "torch", "quant")
    hf_kw = {"gguf_file": path.name} if path.is_file() else {}
    hf_dir = path.parent if path.is_file() else path
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir, **hf_kw)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **hf_kw).eval()

    def chat(text: str) -> np.ndarray:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True)
        return np.asarray(ids if isinstance(ids, list) else ids["input_ids"], dtype=np.int64)

    prompts = [chat(p) for p in PROMPTS]
    ids = prompts[0]
    # warm-up, then interleave the engines so background load hits them alike
    ours_decode_rate(f32, ids, 4)
    ours_decode_rate(quant, ids, 4)
    hf_decode_rate(hf, ids, 4)
    rates: dict[str, list[float]] = {"hf": [], "f32": [], "quant": []}
    for _ in range(reps):
        rates["hf"].append(hf_decode_rate(hf, ids, n))
        rates["f32"].append(ours_decode_rate(f32, ids, n))
        rates["quant"].append(ours_decode_rate(quant, ids, n))
    best = {k: max(v) for k, v in rates.items()}

    agree = []
    for p in prompts[:n_agree]:
        a, b = greedy(f32, p, 16), greedy(quant, p, 16)
        agree.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 16))

    bw = copy_bandwidth()
    out = {
        "model": str(path.name),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "decode_tokens": n,
        "reps": reps,
        "prompt_tokens": len(ids),
        "transformers_tok_s": round(best["hf"], 2),
        "ours_float32_tok_s": round(best["f32"], 2),
        "ours_quant_tok_s": round(best["quant"], 2),
        "ratio_float32_vs_transformers": round(best["f32"] / best["hf"], 3),
        "ratio_quant_vs_transformers": round(best["quant"] / best["hf"], 3),
        "all_runs_tok_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "quant_greedy_agreement_first16": agree,
        "quant_greedy_all_match_16": all(a == 16 for a in agree),
        "copy_bandwidth_GB_s": round(bw / 1e9, 2),
        "float32_weight_bytes_per_token": f32.decode_weight_bytes,
        "quant_weight_bytes_per_token": quant.decode_weight_bytes,
        "float32_weight_GB_s": round(best["f32"] * f32.decode_weight_bytes / 1e9, 2),
        "quant_weight_GB_s": round(best["quant"] * quant.decode_weight_bytes / 1e9, 2),
        "float32_share_of_copy_bandwidth": round(best["f32"] * f32.decode_weight_bytes / bw, 3),
        "quant_share_of_copy_bandwidth": round(best["quant"] * quant.decode_weight_bytes / bw, 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
