"""What a node offers and what a model needs: the planner's inputs, measured or stated."""

from __future__ import annotations

import math
import platform
import time

from kernels.config import ModelConfig
from mesh.planner import ModelProfile


def model_profile(c: ModelConfig, weight_mode: str) -> ModelProfile:
    """The bytes a model's layers, embedding and head take in ``weight_mode``."""
    kv = c.n_kv_heads * c.head_dim
    layer_params = 2 * c.hidden * c.hidden + 2 * c.hidden * kv + 3 * c.hidden * c.intermediate + 2 * c.hidden
    embed = c.vocab_size * c.hidden
    bytes_per = 4 if weight_mode == "float32" else 1
    return ModelProfile(n_layers=c.n_layers, layer_bytes=layer_params * bytes_per, embed_bytes=embed * 4,
                        head_bytes=embed * bytes_per + c.hidden * 4)


def device(backend: str) -> str:
    if backend == "mlx":
        return "metal" if platform.system() == "Darwin" else "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def measure_speed() -> float:
    """A coarse, stable speed score (matrix-vector GFLOP/s, rounded to a power of 1.25)
    so nodes of the same kind get equal shares despite timing noise."""
    import numpy as np

    w = np.random.default_rng(0).standard_normal((1536, 576), dtype=np.float32)
    x = np.ones((576,), dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            w @ x
        best = min(best, time.perf_counter() - t)
    gflops = 20 * 2 * w.size / best / 1e9
    return round(1.25 ** round(math.log(max(gflops, 1e-3), 1.25)), 3)


def memory_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    units = {"k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20, "g": 1e9, "gb": 1e9,
             "gib": 1 << 30, "": 1}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in units or not num:
        raise ValueError(f"{text!r} is not a size like 2GiB or 512MiB")
    return int(float(num) * units[unit])
