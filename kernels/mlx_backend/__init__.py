"""The MLX backend (Metal on Apple silicon, CPU elsewhere) of the Stage interface."""

from kernels.mlx_backend.decoder import MLXDecoderStage, load_mlx_stage

__all__ = ["MLXDecoderStage", "load_mlx_stage"]
