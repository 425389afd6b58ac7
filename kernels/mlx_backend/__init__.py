"""The MLX backend (Metal on Apple silicon, CPU elsewhere) of the Stage interface."""

from kernels.mlx_backend.llama import MLXLlamaStage, load_mlx_stage

__all__ = ["MLXLlamaStage", "load_mlx_stage"]
