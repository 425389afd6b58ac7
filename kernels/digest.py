"""Commitments and the audit tolerance comparison.

``tensor_digest`` hashes a tensor's exact bytes together with its dtype and shape,
so two arrays with the same bytes but different meaning never collide.
``compare`` is what an auditor uses to judge a re-computed output against a
committed one: backends never agree bit for bit, so exact digests only prove
integrity on the wire, and correctness is judged within a tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3
import numpy as np

DIGEST_SIZE = 32


def tensor_digest(x: np.ndarray) -> bytes:
    """BLAKE3 over (dtype, shape, C-contiguous little-endian bytes)."""
    a = np.ascontiguousarray(x)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    h = blake3.blake3()
    h.update(f"{a.dtype.str}|{','.join(map(str, a.shape))}|".encode())
    h.update(memoryview(a).cast("B") if a.size else b"")
    return h.digest()


@dataclass(frozen=True)
class Tolerance:
    """Defaults calibrated loosely on torch float32 vs quantized runs; audits may override."""

    max_row_rel_l2: float = 2e-2
    atol: float = 1e-2
    rtol: float = 5e-2
    max_outside_share: float = 1e-2


@dataclass(frozen=True)
class Comparison:
    max_row_rel_l2: float  # worst row's ||a - b|| / ||b||
    outside_share: float  # share of elements with |a - b| > atol + rtol*|b|
    max_abs: float
    ok: bool


def compare(actual: np.ndarray, reference: np.ndarray, tol: Tolerance = Tolerance()) -> Comparison:
    """Compare ``actual`` with ``reference`` row by row (last axis = features)."""
    if actual.shape != reference.shape:
        return Comparison(float("inf"), 1.0, float("inf"), False)
    a = np.asarray(actual, dtype=np.float64).reshape(-1, actual.shape[-1] if actual.ndim else 1)
    b = np.asarray(reference, dtype=np.float64).reshape(a.shape)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return Comparison(float("inf"), 1.0, float("inf"), False)
    diff = a - b
    row_err = np.linalg.norm(diff, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-12)
    outside = np.abs(diff) > tol.atol + tol.rtol * np.abs(b)
    rel = float(row_err.max()) if row_err.size else 0.0
    share = float(outside.mean()) if outside.size else 0.0
    ok = rel <= tol.max_row_rel_l2 and share <= tol.max_outside_share
    return Comparison(rel, share, float(np.abs(diff).max()) if diff.size else 0.0, ok)
