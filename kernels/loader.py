"""Load a stage: a model file's layer range onto a backend, in a weight mode.

``load_stage`` is the one entry point callers use; the backends' packages pick the
architecture's implementation, and ``kernels.weights`` reads only the range's tensors.
"""

from __future__ import annotations

from pathlib import Path

from kernels.stage import BACKENDS, WEIGHT_MODES, Stage, StageSpec


def load_stage(path: str | Path, spec: StageSpec, backend: str = "torch",
               weight_mode: str = "float32") -> Stage:
    """Load layers of ``spec`` from a GGUF file or HF directory onto ``backend``."""
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode {weight_mode!r}: use one of {WEIGHT_MODES}")
    if backend == "torch":
        from kernels.torch_backend import load_torch_stage

        return load_torch_stage(path, spec, weight_mode)
    if backend == "mlx":
        from kernels.mlx_backend import load_mlx_stage

        return load_mlx_stage(path, spec, weight_mode)
    raise ValueError(f"backend {backend!r}: use one of {BACKENDS}")
