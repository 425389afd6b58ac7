"""Tokenizer speed against transformers' fast tokenizer of the same GGUF, measured in the same run.

(Not bench/tokenize.py: a script of that name shadows the standard library's ``tokenize``.)

Prints one JSON object per model: the time to build each tokenizer from the file, and the
best-of-``--reps`` time to encode a ``--mib`` MiB prompt (English prose, code, CJK, emoji and
whitespace runs, fixed by a seed) and to decode its ids, with ours/transformers ratios (below
1 is faster) and whether the ids agree. A model that is not cached is reported as skipped.

    python bench/tokenizer_speed.py [--models smollm2-135m qwen2.5-coder-0.5b gemma-3-270m] [--mib 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["HF_HUB_OFFLINE"] = "1"

from kernels.tokenizer import Tokenizer
from mesh import models

SNIPPETS = [
    "The quick brown fox jumps over the lazy dog. ",
    "In 1969, 3 astronauts flew 384,400 km to the Moon and back. ",
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]\n\n",
    "\tif (x > 0) {\n\t\treturn x * 2;\n\t}\n",
    "机器学习是人工智能的一个分支。",
    "日本語のテキストと한국어 문장. ",
    "emoji 😀👍🏽👨‍👩‍👧‍👦🇫🇷 ",
    "    indented    with   runs  of spaces\n\n\n",
    "Ünïcödé àccents ñ ß Æ ø. ",
]


def prompt(nbytes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts, size = [], 0
    while size < nbytes:
        s = rng.choice(SNIPPETS)
        parts.append(s)
        size += len(s.encode("utf-8"))
    return "".join(parts)


def best_of(reps: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def model_path(name: str) -> Path | None:
    if name in models.REGISTRY:
        return models.resolve(name) if models.is_cached(name) else None
    found = sorted((models.cache_dir() / name).glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def bench(name: str, text: str, reps: int) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    path = model_path(name)
    if path is None:
        return {"model": name, "skipped": f"not cached; run `python -m mesh models pull {name}`"}
    t = time.perf_counter()
    ours = Tokenizer.from_model(path)
    ours_load = time.perf_counter() - t
    t = time.perf_counter()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ref_load = time.perf_counter() - t

    ours_enc, ids = best_of(reps, lambda: ours.encode(text))
    ref_enc, ref_ids = best_of(reps, lambda: ref(text)["input_ids"])
    ours_dec, _ = best_of(reps, lambda: ours.decode(ids))
    ref_dec, _ = best_of(reps, lambda: ref.decode(ref_ids))
    return {
        "model": name,
        "prompt_bytes": len(text.encode("utf-8")),
        "tokens": len(ids),
        "ids_equal": ids == list(ref_ids),
        "load_s": {"ours": round(ours_load, 3), "transformers": round(ref_load, 3),
                   "ratio": round(ours_load / ref_load, 3)},
        "encode_s": {"ours": round(ours_enc, 4), "transformers": round(ref_enc, 4),
                     "ratio": round(ours_enc / ref_enc, 3)},
        "encode_mib_per_s": round(len(text.encode("utf-8")) / (1 << 20) / ours_enc, 2),
        "decode_s": {"ours": round(ours_dec, 4), "transformers": round(ref_dec, 4),
                     "ratio": round(ours_dec / ref_dec, 3)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b", "gemma-3-270m"])
    parser.add_argument("--mib", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    text = prompt(int(args.mib * (1 << 20)))
    results = [bench(name, text, args.reps) for name in args.models]
    print(json.dumps({"bench": "tokenizer_speed", "mib": args.mib, "reps": args.reps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
