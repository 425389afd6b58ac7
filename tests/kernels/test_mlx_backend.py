"""The MLX backend against the torch backend on the real model (MLX runs on the CPU here).

Tolerances, measured on SmolLM2-135M Q4_1 (logits of magnitude ~30), 5 prompts x 16
greedy steps:

- MLX float32 vs torch float32: max |logit diff| 7.5e-5 .. 1.9e-4 (different summation
  order in matmul, attention and RMSNorm); smallest top-2 gap on the path 1.3e-2. We
  allow LOGIT_ATOL = 2e-3.
- MLX quant vs MLX float32: both use exactly the file's weight values (Q4_1 maps onto
  MLX's affine format without requantizing). On the CPU, MLX's quantized matmul
  dequantizes and runs the same GEMM, so the logits are bit-identical (0.0); on Metal
  only the accumulation order differs. We allow the same LOGIT_ATOL.

Greedy and seeded sampling must then pick identical tokens. A token could only flip
where the two backends' logits straddle a decision boundary: for greedy, a top-2 gap
below the logit difference; for sampling, the counter-based uniform ``u`` landing within
|cdf_torch - cdf_mlx| of a CDF boundary. Failures report that margin next to the
difference, so a genuine near-tie can be told from a backend bug.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from kernels.loader import load_stage
from kernels.sampling import SamplingParams, probabilities, sample, uniform
from kernels.stage import Stage, StageSpec, StepInput
from kernels.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
    "List three fruits that are red.",
    "How many legs does a spider have?",
]
LOGIT_ATOL = 2e-3
GREEDY_STEPS = 16
SAMPLED_STEPS = 32
SAMPLING = SamplingParams(temperature=0.8, seed=1234)


@pytest.fixture(scope="module")
def prompt_ids(model_path) -> list[np.ndarray]:
    tok = Tokenizer.from_model(model_path)
    return [np.asarray(tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])), dtype=np.int64)
            for p in PROMPTS]


@pytest.fixture(scope="module")
def mlx_float32(model_path) -> Stage:
    pytest.importorskip("mlx.core")
    return load_stage(model_path, StageSpec.full(30), "mlx", "float32")


@pytest.fixture(scope="module")
def mlx_quant(model_path) -> Stage:
    pytest.importorskip("mlx.core")
    return load_stage(model_path, StageSpec.full(30), "mlx", "quant")


@pytest.fixture(scope="module")
def torch_float32(model_path) -> Stage:
    return load_stage(model_path, StageSpec.full(30), "torch", "float32")


@pytest.fixture(scope="module")
def mlx_greedy(mlx_float32, prompt_ids):
    return generate(mlx_float32, prompt_ids, GREEDY_STEPS)


def generate(stage: Stage, prompts: list[np.ndarray], steps: int,
             params: SamplingParams = SamplingParams()) -> tuple[list[list[int]], list[list[np.ndarray]]]:
    """All prompts as sessions of one batch: one prefill call, then one batched decode call
    per step. Returns the tokens and the logits row each token was picked from."""
    sessions = [f"{uuid.uuid4()}" for _ in prompts]
    logits = stage.forward([StepInput(s, 0, tokens=ids) for s, ids in zip(sessions, prompts)])
    positions = [len(ids) for ids in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    rows: list[list[np.ndarray]] = [[] for _ in prompts]
    try:
        for step in range(steps):
            for i, row in enumerate(logits):
                rows[i].append(row[0])
                tokens[i].append(sample(row[0], params, positions[i]))
            if step == steps - 1:
                break
            logits = stage.forward([StepInput(s, positions[i], tokens=np.array([tokens[i][-1]]))
                                    for i, s in enumerate(sessions)])
            positions = [p + 1 for p in positions]
    finally:
        for s in sessions:
            stage.free(s)
    return tokens, rows


def greedy_margin(row: np.ndarray) -> float:
    top2 = np.sort(row)[-2:]
    return float(top2[1] - top2[0])


def sampling_margin(row: np.ndarray, position: int) -> float:
    """Distance from the scaled uniform to the nearest CDF boundary."""
    cdf = np.cumsum(probabilities(row, SAMPLING))
    return float(np.min(np.abs(cdf - uniform(SAMPLING.seed, position) * cdf[-1])))


def test_float32_logits_and_greedy_tokens_match_torch(mlx_float32, mlx_greedy, torch_float32, prompt_ids):
    ours, our_rows = mlx_greedy
    ref, ref_rows = generate(torch_float32, prompt_ids, GREEDY_STEPS)
    for i in range(len(PROMPTS)):
        np.testing.assert_allclose(our_rows[i][0], ref_rows[i][0], atol=LOGIT_ATOL, rtol=0)
        if ours[i] != ref[i]:
            k = next(j for j, (a, b) in enumerate(zip(ours[i], ref[i])) if a != b)
            diff = float(np.abs(our_rows[i][k] - ref_rows[i][k]).max())
            pytest.fail(f"prompt {i}: greedy tokens differ at step {k}; top-2 gap "
                        f"{greedy_margin(ref_rows[i][k]):.2e}, logit diff {diff:.2e}")
    assert mlx_float32.weights_digest == torch_float32.weights_digest


def test_seeded_sampling_matches_torch(mlx_float32, torch_float32, prompt_ids):
    prompts = prompt_ids[:2]
    ours, our_rows = generate(mlx_float32, prompts, SAMPLED_STEPS, SAMPLING)
    ref, ref_rows = generate(torch_float32, prompts, SAMPLED_STEPS, SAMPLING)
    for i, ids in enumerate(prompts):
        for k, (a, b) in enumerate(zip(ours[i], ref[i])):
            if a != b:
                position = len(ids) + k
                p_diff = np.abs(np.cumsum(probabilities(our_rows[i][k], SAMPLING))
                                - np.cumsum(probabilities(ref_rows[i][k], SAMPLING))).max()
                pytest.fail(f"prompt {i}: sampled tokens differ at step {k}: mlx {a}, torch {b}; "
                            f"u is {sampling_margin(ref_rows[i][k], position):.2e} from a CDF "
                            f"boundary, the CDFs differ by {p_diff:.2e}")
    # temperature 0.8 really samples: not just the greedy path
    assert any(t != int(np.argmax(r)) for toks, rows in zip(ref, ref_rows) for t, r in zip(toks, rows))


def test_quant_greedy_tokens_match_float32(mlx_quant, mlx_float32, mlx_greedy, prompt_ids):
    quant, quant_rows = generate(mlx_quant, prompt_ids, GREEDY_STEPS)
    full, full_rows = mlx_greedy
    for i in range(len(PROMPTS)):
        np.testing.assert_allclose(quant_rows[i][0], full_rows[i][0], atol=LOGIT_ATOL, rtol=0)
        assert quant[i] == full[i], f"prompt {i}: quant greedy tokens differ from float32"
    assert mlx_quant.weights_digest == mlx_float32.weights_digest
    # 4-bit codes + float32 scale and min per 32 weights, vs 4 bytes per weight
    assert mlx_quant.param_bytes < mlx_float32.param_bytes / 4
