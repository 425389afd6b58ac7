"""Quant-mode matrix products against float32 on the file's own values, per GGUF type and backend.

The reference is ``x @ W.T`` in float32 with W the gguf library's dequantization, so what is
measured is the error the mapping onto a backend's kernel adds, not the file's own
quantization error. Bounds (relative L2 over a (4, 1024) x (1024, 512) product; measured
values are about half of each bound):

| type | torch kernel | torch bound | MLX | MLX bound |
|------|--------------|-------------|-----|-----------|
| Q4_0, Q4_1, Q4_K | int4 (exact codes, bfloat16 scales and activations) | 6e-3 | 4-bit, exact | 1e-5 |
| Q8_0 | int4 split in two halves (exact codes) | 6e-3 | 8-bit, exact | 1e-5 |
| Q5_0, Q5_1, Q5_K | int8 per row (requantized), bfloat16 activations | 1.5e-2 | 5-bit, exact | 1e-5 |
| Q6_K, Q2_K, Q3_K | int8 per row (requantized) | 1.5e-2 | 8-bit (requantized) | 1e-2 |

Measured (this machine): torch int4 2.7-3.0e-3, int8 6.1-8.9e-3; MLX exact types ~4e-7 (float32
summation order), requantized 2.1-4.2e-3. Bytes held per byte of the file are bounded too
(torch int4 1.00-1.11x, split Q8_0 1.18x, int8 1.22-1.46x, 2.3-3.1x for Q2_K/Q3_K; MLX keeps
float32 scales and biases: 1.17-1.33x, 1.52x for Q6_K).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.torch_backend.linear import Int4Linear, Int8Linear, make_head, make_linear
from tests.kernels.test_blocks import COLS, ROWS, make

# type: (torch class, torch bound, torch bytes/file, MLX bits, MLX exact, MLX bound, MLX bytes/file)
CASES = {
    "Q4_0": (Int4Linear, 6e-3, 1.12, 4, True, 1e-5, 1.34),
    "Q4_1": (Int4Linear, 6e-3, 1.01, 4, True, 1e-5, 1.21),
    "Q4_K": (Int4Linear, 6e-3, 1.12, 4, True, 1e-5, 1.34),
    "Q8_0": (Int4Linear, 6e-3, 1.18, 8, True, 1e-5, 1.18),
    "Q5_0": (Int8Linear, 1.5e-2, 1.47, 5, True, 1e-5, 1.28),
    "Q5_1": (Int8Linear, 1.5e-2, 1.34, 5, True, 1e-5, 1.17),
    "Q5_K": (Int8Linear, 1.5e-2, 1.47, 5, True, 1e-5, 1.28),
    "Q6_K": (Int8Linear, 1.5e-2, 1.23, 8, False, 1e-2, 1.53),
    "Q2_K": (Int8Linear, 1.5e-2, 3.07, 8, False, 1e-2, 3.82),
    "Q3_K": (Int8Linear, 1.5e-2, 2.34, 8, False, 1e-2, 2.91),
}


def _rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((4, COLS)).astype(np.float32)


@pytest.mark.parametrize("type_name", sorted(CASES))
def test_torch_quant_matmul_error(type_name: str, inputs: np.ndarray):
    kind, bound, bytes_bound, *_ = CASES[type_name]
    qt = make(type_name)
    ref = inputs @ qt.dequantize().T
    lin = make_linear([qt], None, "quant")
    assert type(lin) is kind
    assert _rel(lin(torch.from_numpy(inputs)).numpy(), ref) < bound
    assert lin.nbytes <= bytes_bound * qt.nbytes
    head = make_head(qt, "quant")(torch.from_numpy(inputs))  # float32 logits: no bfloat16 ties
    assert head.dtype == torch.float32 and _rel(head.numpy(), ref) < 3e-2


def test_fused_parts_of_different_kernels_stay_separate(inputs: np.ndarray):
    """q as Q4_K and v as Q6_K (as Q4_K_M files store them): one int4 and one int8 product."""
    q, v = make("Q4_K", seed=1), make("Q6_K", seed=2)
    bias = np.random.default_rng(3).standard_normal(2 * ROWS).astype(np.float32)
    lin = make_linear([q, v], [bias[:ROWS], bias[ROWS:]], "quant")
    assert [type(p) for p in lin.parts] == [Int4Linear, Int8Linear]
    ref = inputs @ np.concatenate([q.dequantize(), v.dequantize()]).T + bias
    assert _rel(lin(torch.from_numpy(inputs)).numpy(), ref) < 1.5e-2


@pytest.mark.parametrize("type_name", sorted(CASES))
def test_mlx_quant_matmul_error(type_name: str, inputs: np.ndarray):
    mx = pytest.importorskip("mlx.core")
    from kernels.mlx_backend.quant import quantized

    *_, bits, exact, bound, bytes_bound = CASES[type_name]
    qt = make(type_name)
    w = qt.dequantize()
    packed, scales, biases, got_bits = quantized([qt])
    assert got_bits == bits
    held = np.array(mx.dequantize(packed, scales, biases, group_size=32, bits=bits))
    assert np.array_equal(held, w) == exact  # exact types hold the file's values bit for bit
    y = np.array(mx.quantized_matmul(mx.array(inputs), packed, scales, biases, transpose=True,
                                     group_size=32, bits=bits))
    assert _rel(y, inputs @ w.T) < bound
    assert packed.nbytes + scales.nbytes + biases.nbytes <= bytes_bound * qt.nbytes
