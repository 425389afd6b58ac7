"""The torch backend (CPU, CUDA-capable code paths kept plain): one decoder for every architecture
in kernels.config.SUPPORTED_ARCHS, with their differences named in the config."""

from __future__ import annotations

from pathlib import Path

from kernels.stage import Stage, StageSpec


def load_torch_stage(path: str | Path, spec: StageSpec, weight_mode: str = "float32") -> Stage:
    from kernels.torch_backend.decoder import load_decoder_stage

    return load_decoder_stage(path, spec, weight_mode)
