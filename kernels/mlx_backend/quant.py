"""GGUF block matrices as MLX quantized matrices (``mx.quantized_matmul``, affine, group 32).

MLX's affine format is ``w = scale * code + bias`` per group of 32 elements of a row, with
2..8-bit codes packed into uint32 words as one little-endian bit stream per row
(code ``k`` at bit ``k * bits``). The GGUF types that are exactly this form
(``kernels.blocks``: Q4_0, Q4_1, Q4_K as 4-bit; Q5_0, Q5_1, Q5_K as 5-bit; Q8_0 as 8-bit)
are repacked, not requantized: the values are the file's. The others (Q6_K, Q3_K, Q2_K,
whose scales cover 16 elements; the IQ types) are dequantized by the gguf library and
requantized to 8-bit group 32 by ``kernels.blocks.requantize``, whose rounding error is a
small fraction of theirs (tests/kernels/test_quant_error.py states it per type). Those
codes are computed in numpy, not by ``mx.quantize``, so that a float32 auditor on another
backend re-runs the stage on exactly the values it holds (`QuantTensor.held_values`).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from kernels.blocks import AFFINE_BITS
from kernels.weights import QuantTensor

REQUANT_BITS = 8
_PACK_ROWS = 4096  # rows packed at a time: bounds the bit-expansion buffer


def kind(t: np.ndarray | QuantTensor) -> str:
    """Matrices of one kind can be stacked into one MLX matrix."""
    if not isinstance(t, QuantTensor):
        return "float32"
    bits = AFFINE_BITS.get(t.type_name)
    return f"affine{bits}" if bits else f"requant{REQUANT_BITS}"


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes ``(rows, cols)`` -> MLX's uint32 words ``(rows, cols * bits / 32)``."""
    rows, cols = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8).view("<u4")
    if bits == 4:
        pairs = codes.reshape(rows, cols // 2, 2).astype(np.uint8)
        return np.ascontiguousarray(pairs[..., 0] | (pairs[..., 1] << 4)).view("<u4")
    out = np.empty((rows, cols * bits // 32), dtype="<u4")
    shifts = np.arange(bits, dtype=np.uint8)
    for r in range(0, rows, _PACK_ROWS):
        chunk = codes[r:r + _PACK_ROWS]
        stream = ((chunk[..., None] >> shifts) & 1).reshape(len(chunk), -1)
        out[r:r + _PACK_ROWS] = np.packbits(stream, axis=-1, bitorder="little").view("<u4")
    return out


def quantized(group: list[QuantTensor]) -> tuple[mx.array, mx.array, mx.array, int]:
    """Matrices of one ``kind`` stacked along their rows: (packed weight, scales, biases, bits)."""
    k = kind(group[0])
    if any(kind(t) != k for t in group):
        raise ValueError("quantized() needs matrices of one kind")
    affine = [t.held() for t in group]
    bits = affine[0].bits
    codes, scales, biases = (np.concatenate([getattr(a, f) for a in affine])
                             for f in ("codes", "scales", "biases"))
    return mx.array(pack(codes, bits)), mx.array(scales), mx.array(biases), bits
