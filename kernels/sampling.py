"""Token sampling that any backend reproduces exactly from the same logits.

The randomness for the token at sequence position ``p`` is one uniform number
``u = BLAKE3("mesh-sample", seed, p)`` (counter-based: no generator state to carry,
so an auditor can re-check any single step), and every computation after the
float32 logits runs in numpy float64 with deterministic tie-breaking (lower token
id first). Greedy (temperature 0) is plain argmax.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3
import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"invalid sampling parameters {self}: need temperature >= 0, "
                             "top_k >= 0, 0 < top_p <= 1")


GREEDY = SamplingParams()


def finish_reason(token: int, index: int, *, max_tokens: int, eos_ids) -> str | None:
    """Why a generation ends at its ``index``-th generated token (0-based), or None.

    "stop": ``token`` is an end-of-sequence id (it ends the answer and is not part of
    it); "length": it is the ``max_tokens``-th token. The one rule every generation
    loop (one device, the pipeline's last stage, the serving node) follows."""
    if token in eos_ids:
        return "stop"
    if index + 1 >= max_tokens:
        return "length"
    return None


def uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1) from (seed, position): the top 53 bits of a BLAKE3 digest."""
    h = blake3.blake3(b"mesh-sample" + struct.pack("<qq", seed, position)).digest(8)
    return (int.from_bytes(h, "little") >> 11) * 2.0 ** -53


def _largest(x: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` ids (ascending) with the largest ``x``; ties at the cut go to lower ids."""
    if k >= ids.size:
        return ids
    xs = x[ids]
    cut = np.partition(xs, ids.size - k)[ids.size - k]
    above = ids[xs > cut]
    return np.sort(np.concatenate([above, ids[xs == cut][:k - above.size]]))


def probabilities(logits_row: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Float64 probabilities over the vocabulary after temperature, top-k and top-p
    (zero outside the kept set). Not for greedy."""
    x = np.asarray(logits_row, dtype=np.float32).astype(np.float64).reshape(-1)
    x = x / params.temperature
    ids = np.arange(x.size)
    if params.top_k:
        ids = _largest(x, ids, params.top_k)
    if params.top_p < 1.0:
        w = np.exp(x[ids] - x[ids].max())
        total, peak = w.sum(), x[ids].max()
        n = 1024
        while True:  # sort only as many of the largest as hold top_p of the mass
            cand = _largest(x, ids, n)
            # descending by value, ties by lower id: a total order every machine agrees on
            order = cand[np.lexsort((cand, -x[cand]))]
            cum = np.cumsum(np.exp(x[order] - peak)) / total
            if cum[-1] >= params.top_p or cand.size == ids.size:
                break
            n *= 8
        # smallest prefix whose mass reaches top_p (always at least one token)
        ids = order[:min(int(np.searchsorted(cum, params.top_p, side="left")) + 1, order.size)]
    z = np.full(x.shape, -np.inf)
    z[ids] = x[ids]
    p = np.exp(z - z.max())
    return p / p.sum()


def sample(logits_row: np.ndarray, params: SamplingParams, position: int) -> int:
    """The token for sequence ``position`` from one row of float32 logits."""
    if params.temperature == 0.0:
        return int(np.argmax(np.asarray(logits_row).reshape(-1)))
    p = probabilities(logits_row, params)
    cdf = np.cumsum(p)
    idx = int(np.searchsorted(cdf, uniform(params.seed, position) * cdf[-1], side="right"))
    idx = min(idx, p.size - 1)
    while p[idx] == 0.0:  # float edge: never return a masked token
        idx -= 1
    return idx
