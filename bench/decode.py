"""Decode speed of the torch backend against transformers, measured in the same run.

Prints one JSON object per model: decode tokens/s and warm time to first token of our
float32 and quant stages and of transformers' ``generate`` (greedy, float32, same GGUF
weights and prompt), their ratios, greedy agreement of quant vs float32 on the first 16
tokens of 5 prompts (chat prompts, raw text for a model without a chat template), the
weight bytes each stage holds against the file's, and the weight bytes/s our decode
achieves as a share of the memory copy bandwidth measured here.

Where ``llama_cpp`` is importable it runs too, on the same file with the same threads
(optional; not needed by ``make test``; ``pip install llama-cpp-python`` builds it from
source, about 15 minutes on a small machine).

    python bench/decode.py [--model NAME|PATH ...] [--all-models] [--max-tokens 32] [--reps 5] [--quick]
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


def ours_ttft(stage, ids: np.ndarray) -> float:
    """Warm time to the first token: prefill of the prompt and the first sample."""
    stats = GenerationStats()
    for _ in generate(stage, ids, max_tokens=1, stop_ids=[], stats=stats):
        pass
    return stats.ttft_s


def hf_ttft(model, ids: np.ndarray) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(torch.tensor(ids)[None], max_new_tokens=1, min_new_tokens=1, do_sample=False,
                       pad_token_id=0, eos_token_id=None)
        return time.perf_counter() - t


class LlamaCpp:
    """llama.cpp through llama-cpp-python on the same file, if it is installed."""

    def __init__(self, path: Path, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_batch=512,
                                   verbose=False)

    def run(self, ids: np.ndarray, n: int) -> tuple[float, float]:
        """(warm TTFT s, decode tokens/s) of a greedy run of ``n`` tokens."""
        self.llm.reset()
        t = time.perf_counter()
        first = None
        count = 0
        for _ in self.llm.generate([int(i) for i in ids], top_k=1, top_p=1.0, temp=0.0, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter() - t
            if count == n:
                break
        total = time.perf_counter() - t
        return first, (n - 1) / max(total - first, 1e-9)


def bench(path: Path, n: int, reps: int, n_agree: int) -> dict:
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
    has_template = bool(getattr(tok, "chat_template", None))

    def prompt(text: str) -> np.ndarray:
        if not has_template:  # a base model: raw completion
            return np.asarray(tok(text)["input_ids"], dtype=np.int64)
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True)
        return np.asarray(ids if isinstance(ids, list) else ids["input_ids"], dtype=np.int64)

    prompts = [prompt(p) for p in PROMPTS]
    ids = prompts[0]
    llama = None
    try:
        llama = LlamaCpp(path, torch.get_num_threads())
    except ImportError:
        pass
    # warm-up, then interleave the engines so background load hits them alike
    ours_decode_rate(f32, ids, 4)
    ours_decode_rate(quant, ids, 4)
    hf_decode_rate(hf, ids, 4)
    if llama:
        llama.run(ids, 4)
    rates: dict[str, list[float]] = {"hf": [], "f32": [], "quant": []} | ({"llama_cpp": []} if llama else {})
    ttft: dict[str, list[float]] = {k: [] for k in rates}
    for _ in range(reps):
        rates["hf"].append(hf_decode_rate(hf, ids, n))
        ttft["hf"].append(hf_ttft(hf, ids))
        for key, stage in (("f32", f32), ("quant", quant)):
            rates[key].append(ours_decode_rate(stage, ids, n))
            ttft[key].append(ours_ttft(stage, ids))
        if llama:
            first, rate = llama.run(ids, n)
            rates["llama_cpp"].append(rate)
            ttft["llama_cpp"].append(first)
    best = {k: max(v) for k, v in rates.items()}
    first = {k: min(v) for k, v in ttft.items()}

    agree = []
    for p in prompts[:n_agree]:
        a, b = greedy(f32, p, 16), greedy(quant, p, 16)
        agree.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 16))

    from kernels.weights import load_weights

    file_bytes = load_weights(path, spec, "quant").file_bytes()
    bw = copy_bandwidth()
    out = {
        "model": str(path.name),
        "chat_template": has_template,
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
        "warm_ttft_s": {k: round(v, 4) for k, v in first.items()},
        "all_runs_tok_s": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "quant_greedy_agreement_first16": agree,
        "quant_greedy_all_match_16": all(a == 16 for a in agree),
        "file_weight_bytes": file_bytes,
        "float32_param_bytes": f32.param_bytes,
        "quant_param_bytes": quant.param_bytes,
        "quant_bytes_vs_file": round(quant.param_bytes / file_bytes, 3),
        "copy_bandwidth_GB_s": round(bw / 1e9, 2),
        "float32_weight_bytes_per_token": f32.decode_weight_bytes,
        "quant_weight_bytes_per_token": quant.decode_weight_bytes,
        "float32_weight_GB_s": round(best["f32"] * f32.decode_weight_bytes / 1e9, 2),
        "quant_weight_GB_s": round(best["quant"] * quant.decode_weight_bytes / 1e9, 2),
        "float32_share_of_copy_bandwidth": round(best["f32"] * f32.decode_weight_bytes / bw, 3),
        "quant_share_of_copy_bandwidth": round(best["quant"] * quant.decode_weight_bytes / bw, 3),
    }
    if llama:
        out["llama_cpp_tok_s"] = round(best["llama_cpp"], 2)
        out["ratio_quant_vs_llama_cpp"] = round(best["quant"] / best["llama_cpp"], 3)
        out["ratio_quant_ttft_vs_llama_cpp"] = round(first["quant"] / first["llama_cpp"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=None,
                    help="registry name, GGUF file or HF directory; repeat for several (default: smollm2-135m)")
    ap.add_argument("--all-models", action="store_true", help="every registry model (fetched if needed)")
    ap.add_argument("--max-tokens", type=int, default=32, help="decode tokens per timed run")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per engine (best is kept)")
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 rep, 2 agreement prompts")
    args = ap.parse_args()
    n, reps, n_agree = args.max_tokens, args.reps, len(PROMPTS)
    if args.quick:
        n, reps, n_agree = 16, 1, 2
    from mesh import models

    names = list(models.REGISTRY) if args.all_models else (args.model or [models.DEFAULT_MODEL])
    for name in names:
        path = models.resolve(name, fetch=True)
        print(json.dumps(bench(path, n, reps, n_agree)), flush=True)


if __name__ == "__main__":
    main()
