"""The registry's larger models against transformers (float32, the same GGUF), on raw prompts.

For gemma-3-270m (gemma3: sliding and global layers, GeGLU, sandwich norms, QK-norm,
scaled embeddings, a 262k tied head) and qwen2.5-coder-0.5b (qwen2 with K-quants):

- greedy tokens equal to transformers' for the first GREEDY_TOKENS tokens (or to EOS)
  on 5 raw prompts, torch float32;
- the last position's logits within LOGIT_ATOL of transformers';
- MLX float32 against torch: the same greedy tokens, and seeded sampling gives the same
  tokens (2 prompts).

Prompts are tokenized by transformers' tokenizer from the same file (BOS added as the
file says), so the comparison is of the models alone. The chat-template checks of the
instruct model belong to the tokenizer's tests and the API's.

Slow the first time on a machine: transformers takes 70-85 s to load each file (its GGUF
dequantization), ours 7-12 s. Its answers are kept per file and library versions
(tests/reference_cache.py; MESH_TEST_FRESH_REFERENCE=1 recomputes them), so later runs
pay only for our side.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kernels.config import load_config
from kernels.loader import load_stage
from kernels.sampling import GREEDY, SamplingParams, probabilities, sample, uniform
from kernels.stage import Stage, StageSpec, StepInput
from memory_lock import exclusive
from reference_cache import cached_reference

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.slow

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three primary colors are",
    "Water boils at a temperature of",
]
GREEDY_TOKENS = 24
MLX_TOKENS = 12
SAMPLED_TOKENS = 16
SAMPLING = SamplingParams(temperature=0.8, seed=1234)
# last-position logits, ours (torch float32) vs transformers float32, max |diff| over the 5
# prompts, logits of magnitude 16-29: measured 7.6e-6 (gemma-3-270m) and 3.8e-6 (qwen2.5-coder-0.5b)
LOGIT_ATOL = 1e-4
# MLX float32 vs torch float32, first step: measured 6.3e-5 (gemma) and 3.9e-5 (qwen)
MLX_LOGIT_ATOL = 1e-3


def real_model(name: str) -> Path:
    """The registry model's cached file: pulled where the registry knows it (as CI does),
    else any GGUF already in its cache folder."""
    from mesh import models

    if name in models.REGISTRY:
        return models.resolve(name, fetch=True)
    found = sorted((models.cache_dir() / name).glob("*.gguf"))
    if not found:
        pytest.skip(f"{name} is not cached: run `python -m mesh models pull {name}`")
    return found[0]


_loaded: dict[tuple, object] = {}


@pytest.fixture(scope="module", autouse=True)
def _memory_heavy():
    """The real models hold GBs: never beside the in-process meshes (tests/lanes.py)."""
    with exclusive():
        yield


@pytest.fixture(scope="module", params=["gemma-3-270m", "qwen2.5-coder-0.5b"])
def name(request):
    """The model under test. Module-scoped, so pytest runs every test of one model before
    the next, and that model's stages (torch and MLX, float32) are dropped when it is done:
    the module holds one model at a time (12 GB resident when it held both)."""
    yield request.param
    _loaded.clear()


def loaded(key: tuple, make):
    if key not in _loaded:
        _loaded[key] = make()
    return _loaded[key]


def hf_reference(name: str, eos: tuple[int, ...]) -> dict[str, np.ndarray]:
    """transformers on the file: for each raw prompt its ids (``ids{i}``), the last
    position's float32 logits (``logits{i}``) and the greedy tokens (``greedy{i}``).
    Computed once per machine for a given file and library versions (tests/reference_cache.py)."""
    path = real_model(name)

    def compute() -> dict[str, np.ndarray]:
        transformers.logging.set_verbosity_error()
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
        out = {}
        for i, prompt in enumerate(RAW_PROMPTS):
            ids = np.asarray(tok(prompt)["input_ids"], dtype=np.int64)
            with torch.inference_mode():
                out[f"logits{i}"] = model(torch.tensor(ids)[None]).logits[0, -1].numpy()
            out[f"ids{i}"] = ids
            out[f"greedy{i}"] = np.asarray(hf_greedy(model, ids, GREEDY_TOKENS, eos), dtype=np.int64)
        return out

    inputs = {"prompts": RAW_PROMPTS, "greedy_tokens": GREEDY_TOKENS, "eos": list(eos)}
    return loaded(("hf", name), lambda: cached_reference(path, inputs, compute))


def hf_prompts(name: str, eos: tuple[int, ...]) -> list[np.ndarray]:
    ref = hf_reference(name, eos)
    return [ref[f"ids{i}"] for i in range(len(RAW_PROMPTS))]


def mesh_stage(name: str, backend: str) -> Stage:
    def make():
        path = real_model(name)
        return load_stage(path, StageSpec.full(load_config(path).n_layers), backend, "float32")
    return loaded((name, backend), make)


def run(stage: Stage, ids: np.ndarray, n: int, session: str,
        params: SamplingParams = GREEDY) -> tuple[list[int], list[np.ndarray]]:
    """Tokens to ``n`` or EOS, and the logits row each was picked from."""
    tokens, rows = [], []
    logits = stage.forward([StepInput(session, 0, tokens=ids)])[0]
    for i in range(n):
        rows.append(logits[0])
        tokens.append(sample(logits[0], params, len(ids) + i))
        if tokens[-1] in stage.config.eos_token_ids:
            break
        logits = stage.forward([StepInput(session, len(ids) + i, tokens=np.array([tokens[-1]]))])[0]
    stage.free(session)
    return tokens, rows


def hf_greedy(model, ids: np.ndarray, n: int, eos: tuple[int, ...]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor(ids)[None], max_new_tokens=n, do_sample=False,
                             eos_token_id=list(eos), pad_token_id=eos[0])
    tokens = out[0, len(ids):].tolist()
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return tokens


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_torch_greedy_and_logits_match_transformers(name):
    ours = mesh_stage(name, "torch")
    hf = hf_reference(name, ours.config.eos_token_ids)
    for i in range(len(RAW_PROMPTS)):
        ids, ref, expected = hf[f"ids{i}"], hf[f"logits{i}"], hf[f"greedy{i}"].tolist()
        tokens, rows = run(ours, ids, GREEDY_TOKENS, f"t{i}")
        diff = float(np.abs(rows[0] - ref).max())
        assert diff <= LOGIT_ATOL, f"prompt {i}: last-position logits differ by {diff:.2e}"
        if tokens != expected:
            k = _first_difference(tokens, expected)
            top2 = np.sort(rows[k])[-2:]
            pytest.fail(f"prompt {i}: greedy tokens differ at step {k} (ours {tokens[k:k + 1]}, "
                        f"transformers {expected[k:k + 1]}); our top-2 gap there {top2[1] - top2[0]:.2e}")


def test_mlx_matches_torch_greedy_and_seeded_sampling(name):
    pytest.importorskip("mlx.core")
    ref, ours = mesh_stage(name, "torch"), mesh_stage(name, "mlx")
    prompts = hf_prompts(name, ref.config.eos_token_ids)
    assert ours.weights_digest == ref.weights_digest
    for i, ids in enumerate(prompts[:2]):
        for params, n in ((GREEDY, MLX_TOKENS), (SAMPLING, SAMPLED_TOKENS)):
            ref_tokens, ref_rows = run(ref, ids, n, f"r{i}", params)
            our_tokens, our_rows = run(ours, ids, n, f"m{i}", params)
            np.testing.assert_allclose(our_rows[0], ref_rows[0], atol=MLX_LOGIT_ATOL, rtol=0)
            if our_tokens != ref_tokens:
                k = _first_difference(our_tokens, ref_tokens)
                cdf = np.cumsum(probabilities(ref_rows[k], params)) if params.temperature else None
                margin = (float(np.min(np.abs(cdf - uniform(params.seed, len(ids) + k) * cdf[-1])))
                          if cdf is not None else float(np.diff(np.sort(ref_rows[k])[-2:])[0]))
                pytest.fail(f"prompt {i}, {params}: tokens differ at step {k}; decision margin "
                            f"{margin:.2e}, logit diff {np.abs(our_rows[k] - ref_rows[k]).max():.2e}")
