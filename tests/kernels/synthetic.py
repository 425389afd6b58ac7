"""Tiny random models of each architecture, written as GGUF with the gguf library's writer.

``write_tiny_gguf(path, TINY["qwen3"])`` builds a file in well under a second, with the
metadata both kernels.config and transformers' GGUF loader read. Weights are random:

- float and legacy-quantized tensors (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are
  normal values quantized by ``gguf.quants.quantize``;
- K-quant tensors (Q2_K ... Q6_K), which the gguf library cannot quantize, are random
  block bytes whose float16 scale fields are set to small finite values, so every code
  and sub-block scale is random and the weights stay of order 0.1.

A file is a file as llama.cpp lays it out, so llama/mistral q/k rows count as permuted
(both readers un-permute the same way), and Gemma's norm weights are stored as the
full multiplier (``1 + w``, near 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

# K-quant block layouts: bytes per 256 values, offsets of the float16 fields (d, dmin),
# and roughly the largest |code * sub-scale| a block can reach (to size d)
_K_BLOCKS = {
    "Q2_K": (84, (80, 82), 45.0),
    "Q3_K": (110, (108,), 128.0),
    "Q4_K": (144, (0, 2), 945.0),
    "Q5_K": (176, (0, 2), 1953.0),
    "Q6_K": (210, (208,), 4096.0),
}


@dataclass(frozen=True)
class TinySpec:
    arch: str  # GGUF general.architecture
    name: str = "tiny"  # general.name ("mistral" makes transformers build a Mistral model)
    n_layers: int = 3
    hidden: int = 64
    intermediate: int = 96
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    vocab: int = 384
    context: int = 256
    rope_theta: float = 10000.0
    tied: bool = True
    matrix_types: tuple[str, ...] = ("Q8_0",)  # cycled over the layers' matrices
    embed_type: str = "Q8_0"
    head_type: str = "Q8_0"  # untied only
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int = 0  # gemma3
    final_logit_softcap: float = 0.0
    n_experts: int = 0
    n_experts_used: int = 0
    expert_intermediate: int = 0
    extra: dict = field(default_factory=dict)  # more metadata, key -> value


TINY: dict[str, TinySpec] = {
    "llama-kquant": TinySpec("llama", tied=False, matrix_types=("Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K"),
                             embed_type="Q4_K", head_type="Q6_K", intermediate=256, hidden=256,
                             n_heads=8, n_kv_heads=4, head_dim=32),
    "mistral": TinySpec("llama", name="mistral", tied=False, matrix_types=("Q4_0", "Q8_0", "Q4_1")),
    "qwen3": TinySpec("qwen3", qk_norm=True, head_dim=128, n_heads=2, n_kv_heads=1,
                      matrix_types=("Q8_0", "Q4_0")),
    "qwen3moe": TinySpec("qwen3moe", qk_norm=True, head_dim=32, n_heads=4, n_kv_heads=2, n_layers=2,
                         n_experts=6, n_experts_used=2, expert_intermediate=64, intermediate=128,
                         matrix_types=("Q8_0",)),
    # head_dim 256 and 6 layers: transformers' GGUF loader takes query_pre_attn_scalar 256 and
    # every 6th layer global from Gemma3's defaults (llama.cpp: head_dim, and every 6th)
    "gemma3": TinySpec("gemma3", n_layers=6, qk_norm=True, head_dim=256, n_heads=2, n_kv_heads=1,
                       sliding_window=4, rope_theta=1_000_000.0, context=512, hidden=256, intermediate=256,
                       matrix_types=("Q5_0", "Q8_0", "Q4_K", "Q6_K"), embed_type="Q8_0"),
}


def _random_k_blocks(rng: np.random.Generator, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    size, f16_offsets, reach = _K_BLOCKS[type_name]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    for off in f16_offsets:
        d = (rng.uniform(0.5, 1.5, size=blocks.shape[:2]) * 0.1 / reach).astype(np.float16)
        blocks[:, :, off:off + 2] = d.view(np.uint8).reshape(*d.shape, 2)
    return blocks.reshape(*shape[:-1], cols // 256 * size)


class _Writer:
    def __init__(self, spec: TinySpec, path: Path, seed: int):
        self.spec, self.rng = spec, np.random.default_rng(seed)
        self.w = gguf.GGUFWriter(str(path), spec.arch)
        self._n = 0

    def tensor(self, name: str, shape: tuple[int, ...], type_name: str, std: float = 0.1,
               mean: float = 0.0) -> None:
        if type_name in _K_BLOCKS:
            data = _random_k_blocks(self.rng, type_name, shape)
            self.w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=Q[type_name])
            return
        values = (mean + std * self.rng.standard_normal(shape)).astype(np.float32)
        if type_name == "F32":
            self.w.add_tensor(name, values)
        elif type_name == "F16":
            self.w.add_tensor(name, values.astype(np.float16))
        else:
            data = gguf.quants.quantize(values, Q[type_name])
            self.w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=Q[type_name])

    def matrix(self, name: str, shape: tuple[int, ...]) -> None:
        types = self.spec.matrix_types
        self.tensor(name, shape, types[self._n % len(types)], std=shape[-1] ** -0.5)
        self._n += 1


def write_tiny_gguf(path: Path, spec: TinySpec, seed: int = 0) -> Path:
    """Write a random model of ``spec`` to ``path`` and return it."""
    s = spec
    out = _Writer(s, path, seed)
    w, a = out.w, s.arch
    w.add_name(s.name)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.n_layers)
    w.add_feed_forward_length(s.intermediate)
    w.add_head_count(s.n_heads)
    w.add_head_count_kv(s.n_kv_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(s.vocab)
    if s.sliding_window:
        w.add_sliding_window(s.sliding_window)
    if s.final_logit_softcap:
        w.add_final_logit_softcapping(s.final_logit_softcap)
    if s.n_experts:
        w.add_expert_count(s.n_experts)
        w.add_expert_used_count(s.n_experts_used)
        w.add_expert_feed_forward_length(s.expert_intermediate)
    for key, value in s.extra.items():
        w.add_key_value(f"{a}.{key}", value, _value_type(value))
    # a vocabulary of plain pieces: enough for any reader of the metadata
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(s.vocab)])
    w.add_token_types([gguf.TokenType.NORMAL] * s.vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    gemma = a == "gemma3"
    norm_mean = 1.0  # a multiplier near 1; for Gemma this is the stored 1 + w
    out.tensor("token_embd.weight", (s.vocab, s.hidden), s.embed_type, std=1.0 if not gemma else 0.1)
    out.tensor("output_norm.weight", (s.hidden,), "F32", std=0.1, mean=norm_mean)
    if not s.tied:
        out.tensor("output.weight", (s.vocab, s.hidden), s.head_type, std=s.hidden ** -0.5)
    q_dim, kv_dim = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    for i in range(s.n_layers):
        p = f"blk.{i}."
        out.tensor(p + "attn_norm.weight", (s.hidden,), "F32", std=0.1, mean=norm_mean)
        out.tensor(p + "ffn_norm.weight", (s.hidden,), "F32", std=0.1, mean=norm_mean)
        if gemma:
            out.tensor(p + "post_attention_norm.weight", (s.hidden,), "F32", std=0.1, mean=norm_mean)
            out.tensor(p + "post_ffw_norm.weight", (s.hidden,), "F32", std=0.1, mean=norm_mean)
        out.matrix(p + "attn_q.weight", (q_dim, s.hidden))
        out.matrix(p + "attn_k.weight", (kv_dim, s.hidden))
        out.matrix(p + "attn_v.weight", (kv_dim, s.hidden))
        out.matrix(p + "attn_output.weight", (s.hidden, q_dim))
        if s.qkv_bias:
            for n, dim in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                out.tensor(f"{p}attn_{n}.bias", (dim,), "F32", std=0.1)
        if s.qk_norm:
            out.tensor(p + "attn_q_norm.weight", (s.head_dim,), "F32", std=0.1, mean=norm_mean)
            out.tensor(p + "attn_k_norm.weight", (s.head_dim,), "F32", std=0.1, mean=norm_mean)
        if s.n_experts:
            e, ff = s.n_experts, s.expert_intermediate
            out.tensor(p + "ffn_gate_inp.weight", (e, s.hidden), "F32", std=1.0)
            out.matrix(p + "ffn_gate_exps.weight", (e, ff, s.hidden))
            out.matrix(p + "ffn_up_exps.weight", (e, ff, s.hidden))
            out.matrix(p + "ffn_down_exps.weight", (e, s.hidden, ff))
        else:
            out.matrix(p + "ffn_gate.weight", (s.intermediate, s.hidden))
            out.matrix(p + "ffn_up.weight", (s.intermediate, s.hidden))
            out.matrix(p + "ffn_down.weight", (s.hidden, s.intermediate))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _value_type(value) -> gguf.GGUFValueType:
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    return gguf.GGUFValueType.STRING


def tiny(kind: str, **changes) -> TinySpec:
    """``TINY[kind]`` with some fields changed."""
    return replace(TINY[kind], **changes)
