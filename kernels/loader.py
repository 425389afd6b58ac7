"""Load a stage: a model file's layer range onto a backend, in a weight mode.

``load_stage`` is the one entry point callers use; the backends' packages pick the
architecture's implementation, and ``kernels.weights`` reads only the range's tensors.
``build_stage`` makes a stage of weights already read (the speed probe's copies).
"""

from __future__ import annotations

from pathlib import Path

from kernels.stage import BACKENDS, LOAD_MODES, MLX_QUANT_VALUES, WEIGHT_MODES, Stage, StageSpec
from kernels.weights import StageWeights, load_weights


def load_stage(path: str | Path, spec: StageSpec, backend: str = "torch",
               weight_mode: str = "float32") -> Stage:
    """Load layers of ``spec`` from a GGUF file or HF directory onto ``backend``
    (``weight_mode`` also `MLX_QUANT_VALUES`: float32 on a quant-mode MLX stage's values)."""
    if weight_mode == MLX_QUANT_VALUES:
        _check(backend, "float32")
        return build_stage(load_weights(path, spec, "quant").held_by_mlx_quant(), backend, "float32")
    _check(backend, weight_mode)
    return build_stage(load_weights(path, spec, weight_mode), backend, weight_mode)


def build_stage(weights: StageWeights, backend: str = "torch", weight_mode: str = "float32") -> Stage:
    """A stage of ``weights`` (read in ``weight_mode``) on ``backend``."""
    _check(backend, weight_mode)
    if backend == "torch":
        from kernels.torch_backend.decoder import TorchDecoderStage, set_default_threads

        set_default_threads()
        return TorchDecoderStage(weights, weight_mode)
    from kernels.mlx_backend import MLXDecoderStage

    return MLXDecoderStage(weights, weight_mode)


def _check(backend: str, weight_mode: str) -> None:
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight_mode {weight_mode!r}: use one of {LOAD_MODES}")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {BACKENDS}")
