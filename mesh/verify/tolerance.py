"""Audit tolerances per numeric class, and the canonical-grid hash baseline.

Numbers are calibrated by bench/verify.py (honest cross-backend runs) and written
down in docs/verification.md. Two numeric classes exist today:

- ``f32``: torch float32, MLX float32 and MLX quant (float32 compute on its group-32
  affine codes; a torch auditor loads exactly those values, `audit_weight_mode`): honest
  pairs agree to ~5e-6 per row (relative L2);
- ``bf16``: torch quant (int4/int8 weights with bfloat16 activations): its rounding
  depends on the kernel shapes, so only torch quant re-run in the same step shapes can
  reproduce it, to ~4e-3.
"""

from __future__ import annotations

import blake3
import numpy as np

from kernels.digest import Tolerance
from kernels.stage import MLX_QUANT_VALUES

F32 = Tolerance(max_row_rel_l2=1e-3, atol=1e-3, rtol=1e-2, max_outside_share=1e-3)
BF16 = Tolerance(max_row_rel_l2=6e-3, atol=5e-2, rtol=5e-2, max_outside_share=5e-3)


def numeric_class(backend: str, weight_mode: str) -> str:
    return "bf16" if (backend, weight_mode) == ("torch", "quant") else "f32"


def audit_backend(producer_backend: str, weight_mode: str, auditor_backend: str) -> str:
    """The backend an auditor re-runs with: its own, unless only torch reproduces the class."""
    return "torch" if numeric_class(producer_backend, weight_mode) == "bf16" else auditor_backend


def audit_weight_mode(producer_backend: str, weight_mode: str, auditor_backend: str) -> str:
    """The weight mode that reproduces the producer's numeric class on ``audit_backend``:
    a quant-mode MLX stage holds requantized values for some block types (Q6_K, Q3_K,
    Q2_K: about 1e-2 relative L2 off the file's after a few Gemma layers), so its float32
    auditor on torch loads exactly those values (`MLX_QUANT_VALUES`), not the file's."""
    if numeric_class(producer_backend, weight_mode) == "bf16":
        return "quant"
    if audit_backend(producer_backend, weight_mode, auditor_backend) == "torch":
        return MLX_QUANT_VALUES if (producer_backend, weight_mode) == ("mlx", "quant") else "float32"
    return weight_mode


def tolerance_for(producer_backend: str, weight_mode: str) -> Tolerance:
    return BF16 if numeric_class(producer_backend, weight_mode) == "bf16" else F32


def grid_hash(x: np.ndarray) -> bytes:
    """The seed design's canonical grid: clamp to [-100, 100], x64, round, hash."""
    q = np.rint(np.clip(np.asarray(x, dtype=np.float64), -100.0, 100.0) * 64.0).astype(np.int32)
    return blake3.blake3(q.tobytes()).digest()
