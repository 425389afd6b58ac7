"""The torch backend (CPU, CUDA-capable code paths kept plain): one file per architecture."""

from __future__ import annotations

from pathlib import Path

from kernels.config import load_config
from kernels.stage import Stage, StageSpec

# every architecture kernels supports is Llama-shaped (qkv bias is a flag)
_ARCHS = {"llama", "mistral", "qwen2"}


def load_torch_stage(path: str | Path, spec: StageSpec, weight_mode: str = "float32") -> Stage:
    config = load_config(path)
    if config.arch in _ARCHS:
        from kernels.torch_backend.llama import load_llama_stage

        return load_llama_stage(path, spec, weight_mode)
    raise ValueError(f"torch backend has no implementation for {config.arch!r}")
