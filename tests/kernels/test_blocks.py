"""kernels.blocks' group-affine decoding equals the gguf library's dequantization, bit for bit,
and every block type in the registry's real files loads as the library reads it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from kernels.blocks import AFFINE_BITS, decode
from kernels.gguf import open_gguf
from kernels.weights import QuantTensor

Q = gguf.GGMLQuantizationType
ROWS, COLS = 64, 512


def random_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random codes and scales of a type the library cannot quantize, with finite float16 fields."""
    block, size = gguf.GGML_QUANT_SIZES[Q[type_name]]
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    b = raw.reshape(-1, size)
    float16_at = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,)}[type_name]
    for at in float16_at:
        b[:, at:at + 2] = rng.uniform(1e-3, 2e-2, (len(b), 1)).astype(np.float16).view(np.uint8)
    return raw


def make(type_name: str, rows: int = ROWS, cols: int = COLS, seed: int = 0) -> QuantTensor:
    """A matrix of ``type_name`` blocks: quantized by the library where it can, else random blocks."""
    rng = np.random.default_rng(seed)
    try:
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, Q[type_name])
    except NotImplementedError:
        raw = random_blocks(type_name, rows, cols, rng)
    return QuantTensor(type_name, (rows, cols), raw)


@pytest.mark.parametrize("type_name", sorted(AFFINE_BITS))
def test_affine_decode_equals_the_library(type_name: str):
    qt = make(type_name)
    ref = gguf.quants.dequantize(qt.raw, Q[type_name])
    a = decode(qt.raw, type_name, ROWS, COLS)
    assert a.bits == AFFINE_BITS[type_name] and a.codes.max() < 2 ** a.bits
    assert a.codes.shape == (ROWS, COLS) and a.scales.shape == (ROWS, COLS // 32)
    np.testing.assert_array_equal(a.dequantize(), ref)


def test_decode_refuses_types_without_a_group32_form():
    with pytest.raises(ValueError, match="Q6_K"):
        decode(make("Q6_K").raw, "Q6_K", ROWS, COLS)


def test_rows_decode_only_the_rows_asked_for():
    qt = make("Q4_K")
    ids = np.array([5, 0, 63, 5])
    np.testing.assert_array_equal(qt.rows(ids), qt.dequantize()[ids])


def _check_real_file(path: Path, min_types: set[str]) -> None:
    gf = open_gguf(path)
    reader = gguf.GGUFReader(path)  # the library on its own, the reference
    # The smallest 2-D tensor of each block type: every type is covered, and a 262k-row
    # embedding is not dequantized four times over (36 s per file when it was the first).
    smallest: dict[str, object] = {}
    for t in reader.tensors:
        info = gf.tensors[t.name]
        if len(info.shape) == 2 and (info.type_name not in smallest
                                     or t.n_elements < smallest[info.type_name].n_elements):
            smallest[info.type_name] = t
    seen: set[str] = set()
    for t in smallest.values():
        info = gf.tensors[t.name]
        seen.add(info.type_name)
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(info.shape)
        np.testing.assert_array_equal(gf.dequantize(t.name), ref, err_msg=t.name)
        if info.type_name in ("F32", "F16", "BF16"):
            continue
        qt = QuantTensor(info.type_name, info.shape, np.ascontiguousarray(gf.raw(t.name)))
        assert qt.nbytes == info.nbytes == t.n_bytes
        np.testing.assert_array_equal(qt.dequantize(), ref, err_msg=t.name)
        if info.type_name in AFFINE_BITS:
            np.testing.assert_array_equal(qt.affine().dequantize(), ref, err_msg=t.name)
    assert min_types <= seen, f"{path.name}: expected block types {min_types}, found {seen}"


def test_default_model_block_types_equal_the_library(model_path: Path):
    _check_real_file(model_path, {"Q4_1", "Q8_0"})


def _registry(name: str) -> Path:
    from mesh import models

    return models.resolve(name, fetch=True)


@pytest.mark.slow
@pytest.mark.parametrize("name, types", [
    ("qwen2.5-coder-0.5b", {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}),
    ("gemma-3-270m", {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}),
])
def test_registry_model_block_types_equal_the_library(name: str, types: set[str]):
    _check_real_file(_registry(name), types)



def test_an_expert_of_a_stacked_tensor_is_its_own_rows():
    stacked = make("Q4_K", rows=3 * 16, cols=256)
    experts = QuantTensor("Q4_K", (3, 16, 256), stacked.raw)
    full = stacked.dequantize().reshape(3, 16, 256)
    for e in range(3):
        np.testing.assert_array_equal(experts[e].dequantize(), full[e])
    np.testing.assert_array_equal(experts.dequantize(), full)
