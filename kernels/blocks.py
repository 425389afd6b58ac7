"""GGUF block types re-expressed as group-wise affine codes, the form quantized kernels take.

A group-affine matrix stores, per group of ``GROUP`` = 32 consecutive elements of a row,
a float ``scale`` and ``bias`` and one unsigned ``bits``-bit code per element:
``w = scale * code + bias``. That is MLX's ``mx.quantize`` format, and, with
``zero = bias + 8 * scale``, torch's CPU int4 group-32 kernel. Several GGUF block types
are exactly this form, only packed differently:

| type | bits | per group of 32 (d, m: float16 of the block; sc, mn: 6-bit sub-block values) |
|------|------|-------------------------------------------------------------------------------|
| Q4_0 | 4 | ``scale = d``, ``bias = -8 d`` |
| Q4_1 | 4 | ``scale = d``, ``bias = m`` |
| Q5_0 | 5 | ``scale = d``, ``bias = -16 d`` |
| Q5_1 | 5 | ``scale = d``, ``bias = m`` |
| Q8_0 | 8 | ``scale = d``, ``bias = -128 d``, ``code = q + 128`` |
| Q4_K | 4 | ``scale = d * sc``, ``bias = -(dmin * mn)``, 8 groups per 256-block |
| Q5_K | 5 | as Q4_K with a fifth bit per code |

``decode`` computes the scales and biases with the float32 operations
``gguf.quants.dequantize`` uses, so ``scale * code + bias`` equals the library's values
bit for bit (tests/kernels/test_blocks.py). The other types (Q2_K, Q3_K and Q6_K, whose
sub-blocks are 16 elements; the IQ types) have no exact group-32 form.

Bit layouts, from ggml's ``block_q*`` structs: a 32-element block keeps element ``j < 16``
in the low nibble of byte ``j`` and element ``j >= 16`` in the high nibble of byte
``j - 16``, and the fifth bits of Q5_0/Q5_1 as one little-endian uint32 (bit ``j`` for
element ``j``). A 256-element K block splits its 128 code bytes into 4 chunks of 32;
chunk ``c`` holds group ``2c`` in its low nibbles and group ``2c + 1`` in its high ones;
Q5_K's 32 ``qh`` bytes give element ``l`` of group ``g`` its fifth bit at bit ``g`` of
byte ``l``. The 12 K scale bytes pack eight 6-bit scales and eight 6-bit mins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 32
AFFINE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q8_0": 8}
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176}


@dataclass
class Affine:
    """``w[r, g*32 + i] = scales[r, g] * codes[r, g*32 + i] + biases[r, g]``."""

    codes: np.ndarray  # uint8 (rows, cols), 0 .. 2**bits - 1
    scales: np.ndarray  # float32 (rows, cols // 32)
    biases: np.ndarray  # float32 (rows, cols // 32)
    bits: int

    def dequantize(self) -> np.ndarray:
        rows, cols = self.codes.shape
        w = self.codes.reshape(rows, cols // GROUP, GROUP).astype(np.float32)
        return (self.scales[..., None] * w + self.biases[..., None]).reshape(rows, cols)


_REQUANT_ROWS = 8192  # rows requantized at a time: bounds the float32 temporaries


def requantize(dense: np.ndarray, bits: int = 8) -> Affine:
    """Float32 ``(rows, cols)`` as group-32 affine codes: each group's minimum is its bias,
    its range over ``2**bits - 1`` its scale, codes rounded to nearest. For the block types
    with no exact affine form (Q6_K, Q3_K, Q2_K, whose scales cover 16 elements), so that
    MLX's quant mode and a float32 re-run of it (an auditor's) hold the very same values."""
    rows, cols = dense.shape
    levels = (1 << bits) - 1
    codes = np.empty((rows, cols), np.uint8)
    scales = np.empty((rows, cols // GROUP), np.float32)
    biases = np.empty((rows, cols // GROUP), np.float32)
    for r in range(0, rows, _REQUANT_ROWS):
        g = np.asarray(dense[r:r + _REQUANT_ROWS], np.float32).reshape(-1, cols // GROUP, GROUP)
        lo, hi = g.min(axis=-1), g.max(axis=-1)
        scale = (hi - lo) / np.float32(levels)
        step = np.where(scale > 0, scale, np.float32(1.0))
        q = np.rint((g - lo[..., None]) / step[..., None])
        codes[r:r + _REQUANT_ROWS] = np.clip(q, 0, levels).astype(np.uint8).reshape(-1, cols)
        scales[r:r + _REQUANT_ROWS], biases[r:r + _REQUANT_ROWS] = scale, lo
    return Affine(codes, scales, biases, bits)


def decode(raw: np.ndarray, type_name: str, rows: int, cols: int) -> Affine:
    """A matrix of ``type_name`` blocks (``raw``: uint8, rows of blocks) as group-affine codes."""
    if type_name not in AFFINE_BITS:
        raise ValueError(f"GGUF type {type_name} has no exact group-{GROUP} affine form")
    b = np.ascontiguousarray(raw).reshape(-1, _BLOCK_BYTES[type_name])
    codes, scales, biases = _DECODERS[type_name](b)
    return Affine(codes.reshape(rows, cols), scales.reshape(rows, cols // GROUP),
                  biases.reshape(rows, cols // GROUP), AFFINE_BITS[type_name])


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte ``at`` of each block, as float32 ``(n, 1)``."""
    return np.ascontiguousarray(b[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per row -> 32 codes: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes per row (a little-endian uint32) -> 32 bits, bit j for element j, shifted to 16."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")
    return bits << 4


def _q4_0(b):
    d = _f16(b, 0)
    return _nibbles(b[:, 2:]), d, d * np.float32(-8)


def _q4_1(b):
    return _nibbles(b[:, 4:]), _f16(b, 0), _f16(b, 2)


def _q5_0(b):
    d = _f16(b, 0)
    return _nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6]), d, d * np.float32(-16)


def _q5_1(b):
    return _nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8]), _f16(b, 0), _f16(b, 2)


def _q8_0(b):
    d = _f16(b, 0)
    codes = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, d, d * np.float32(-128)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes per block -> eight 6-bit scales and eight 6-bit mins (float32).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; the top 2 bits of
    bytes 0-3 and 4-7 are the high bits of scales 4-7 and mins 4-7, whose low 4 bits are
    the low and high nibbles of bytes 8-11.
    """
    lo_sc, lo_mn, tail = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([lo_sc & 0x3F, (tail & 0x0F) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_mn & 0x3F, (tail >> 4) | ((lo_mn >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_codes(qs: np.ndarray) -> np.ndarray:
    """128 bytes per block -> (n, 8 groups, 32) 4-bit codes."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def _k_affine(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc, mn = _k_scales(b[:, 4:16])
    return _f16(b, 0) * sc, -(_f16(b, 2) * mn)


def _q4_k(b):
    scales, biases = _k_affine(b)
    return _k_codes(b[:, 16:144]), scales, biases


def _q5_k(b):
    scales, biases = _k_affine(b)
    qh = b[:, 16:48]  # (n, 32): bit g of byte l is the fifth bit of element l of group g
    fifth = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    return _k_codes(b[:, 48:176]) | (fifth << 4), scales, biases


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
             "Q4_K": _q4_k, "Q5_K": _q5_k}
