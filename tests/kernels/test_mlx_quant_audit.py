"""A quant-mode MLX stage is audited on torch float32 on exactly the values it holds.

MLX's quant mode keeps the GGUF block types that are group-32 affine as the file's codes,
and requantizes the others (Q6_K, Q3_K, Q2_K) to 8 bits. A Q4_K_M file has Q6_K tensors:
on gemma-3-270m its quant-mode output after a few layers is about 1.6e-3 relative L2 away
from the file's float32 values (qwen2.5-coder-0.5b: 4.7e-3), over the f32 audit tolerance
(1e-3), so a torch auditor re-running on the file's values failed every honest audit of
such a stage (bench/verify.py --model gemma-3-270m --honest-only: "mlx-quant <- torch-f32",
false positive rate 1.0). The auditor now loads `MLX_QUANT_VALUES`; measured 1.4e-6 and
4.0e-6.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels.blocks import AFFINE_BITS, requantize
from kernels.loader import load_stage
from kernels.stage import MLX_QUANT_VALUES, StageSpec, StepInput
from kernels.weights import QuantTensor, load_weights
from mesh.verify.tolerance import F32

pytest.importorskip("mlx.core")
pytestmark = pytest.mark.slow

F32_ROW_REL_L2 = F32.max_row_rel_l2
IDS = np.array([2, 651, 6037, 576, 6081, 603, 1645, 573], np.int64)


def _rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.max(np.linalg.norm(x - y, axis=-1) / np.linalg.norm(y, axis=-1)))


@pytest.fixture(scope="module")
def gemma():
    from mesh import models

    return models.resolve("gemma-3-270m", fetch=True)


def test_the_file_has_block_types_mlx_requantizes(gemma):
    weights = load_weights(gemma, StageSpec(0, 4, embed=True), "quant")
    types = {t.type_name for t in weights.tensors.values() if isinstance(t, QuantTensor)}
    assert types - set(AFFINE_BITS), types  # else this module tests nothing


def test_a_torch_auditor_reproduces_an_mlx_quant_stage_within_the_f32_tolerance(gemma):
    spec = StageSpec(0, 4, embed=True)
    step = [StepInput("s", 0, tokens=IDS)]
    produced = load_stage(gemma, spec, "mlx", "quant").forward(step)[0]
    audited = load_stage(gemma, spec, "torch", MLX_QUANT_VALUES).forward(step)[0]
    file_values = load_stage(gemma, spec, "torch", "float32").forward(step)[0]
    assert _rel(produced, audited) < F32_ROW_REL_L2 / 20
    assert _rel(produced, file_values) > F32_ROW_REL_L2  # what the auditor used to compare with


def test_requantize_is_the_nearest_8_bit_affine_code_of_each_group_of_32():
    rng = np.random.default_rng(3)
    dense = rng.standard_normal((40, 96)).astype(np.float32)
    dense[3, :32] = 0.5  # a constant group: scale 0, every code 0, the value exact
    held = requantize(dense)
    back = held.dequantize()
    assert back[3, :32].tolist() == [0.5] * 32
    step = held.scales.repeat(32, axis=1)
    assert np.all(np.abs(back - dense) <= step / 2 + 1e-6)
    g = dense.reshape(40, 3, 32)
    assert np.array_equal(held.biases, g.min(axis=-1))
    assert held.codes.max() == 255 and held.codes.dtype == np.uint8
