"""How fast this device decodes a model's layers: the planner's speed score, measured.

A decode step is a chain of matrix-vector products, bound by memory bandwidth: what
it costs depends on how many weight bytes a step streams from memory, on the backend
and in the weight mode that will run them. So the probe builds the model's own layer
(layer 0, read from the file) on that backend, copied until the copies hold
``min_bytes`` (more than a CPU's last-level cache, so each step reads memory rather
than cache), and times one-token decode steps through them. The best step of several
is the score: other processes (the other nodes of a loopback mesh, starting at the
same time) only ever make a step slower.

    rate = measure_decode_rate(path, "torch", "quant")
    rate.layers_per_s   # decoder layers per second in one decode step
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kernels.loader import build_stage
from kernels.stage import StageSpec, StepInput
from kernels.weights import QuantTensor, StageWeights, load_weights

DEFAULT_MIN_BYTES = 96 << 20  # above the last-level cache of most CPUs (32 MiB here), 3x over
MAX_COPIES = 256


@dataclass(frozen=True)
class DecodeRate:
    layers_per_s: float  # decoder layers one decode step runs per second (best step)
    backend: str
    weight_mode: str
    layer_bytes: int  # one layer's weights as the backend holds them
    copies: int  # layers in the probe (all read every step)
    steps: int
    best_step_s: float
    seconds: float  # the probe's wall time, building included

    def describe(self) -> str:
        return (f"measured: {self.backend}/{self.weight_mode} decode of {self.copies} copies of the model's layer "
                f"({self.copies * self.layer_bytes / (1 << 20):.0f} MiB), best of {self.steps} steps")


def measure_decode_rate(path: str | Path, backend: str = "torch", weight_mode: str = "float32", *,
                        min_bytes: int = DEFAULT_MIN_BYTES, steps: int = 6,
                        timer: Callable[[], float] = time.perf_counter) -> DecodeRate:
    """Time one-token decode steps of the model's layer 0 on ``backend``, copied to hold
    at least ``min_bytes``; see the module docstring."""
    started = timer()
    one = load_weights(path, StageSpec(0, 1), weight_mode)
    layer_bytes = build_stage(one, backend, weight_mode).param_bytes
    copies = max(1, min(MAX_COPIES, math.ceil(min_bytes / max(layer_bytes, 1))))
    stage = build_stage(_copies(one, copies), backend, weight_mode)
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((1, one.config.hidden), dtype=np.float32)
    best = float("inf")
    for pos in range(steps + 1):  # the first step warms up (allocations, kernel choice)
        t = timer()
        stage.forward([StepInput("probe", pos, hidden=hidden)])
        if pos:
            best = min(best, timer() - t)
    stage.free("probe")
    del stage, one
    release_freed_memory()
    return DecodeRate(layers_per_s=copies / best, backend=backend, weight_mode=weight_mode, layer_bytes=layer_bytes,
                      copies=copies, steps=steps, best_step_s=best, seconds=timer() - started)


def release_freed_memory() -> None:
    """Hand freed memory back to the OS (the probe's ~100 MiB; a test's meshes' GBs):
    glibc keeps freed blocks below its (grown) mmap threshold in the heap, and a node's
    memory budget counts what it keeps (measured here: 220 MiB of anonymous RSS left after
    a float32 probe, 20 MiB after the trim)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator returns memory on its own terms
        pass


def _copies(one: StageWeights, n: int) -> StageWeights:
    """Layer 0 of ``one`` as layers 0..n-1, each in memory of its own (a copy that shared
    the first one's storage would be read from cache)."""
    c = one.config
    config = dataclasses.replace(c, n_layers=n, sliding_layers=(c.sliding_layers[:1] * n) if c.sliding_layers else ())
    prefix = "model.layers.0."
    tensors = {}
    for i in range(n):
        for name, t in one.tensors.items():
            if name.startswith(prefix):
                tensors[f"model.layers.{i}.{name[len(prefix):]}"] = _copy(t)
    return StageWeights(config, StageSpec(0, n), tensors, source_digest=b"probe")


def _copy(t):
    if isinstance(t, QuantTensor):
        return QuantTensor(t.type_name, t.shape, t.raw.copy())
    return np.array(t, copy=True)
