"""Tensor compute for mesh: model loading, Llama-family stages (torch, MLX), sampling.

Knows nothing of networks. Everything crossing this package's boundary is numpy.
"""

from kernels.config import ModelConfig, load_config
from kernels.loader import load_stage
from kernels.stage import Stage, StageSpec, StepInput

__all__ = ["ModelConfig", "Stage", "StageSpec", "StepInput", "load_config", "load_stage"]
