"""Architecture hyper-parameters of a decoder model, from GGUF metadata or config.json.

Every architecture kernels runs is one decoder with a few named differences, all
fields of ``ModelConfig`` (the defaults are plain Llama):

=============  ==========================================================================
llama/mistral  the base: RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP
qwen2          ``qkv_bias``
qwen3          ``qk_norm`` (an RMSNorm over each head of q and k, before RoPE)
qwen3moe       ``qk_norm`` and a routed MLP: ``n_experts``, top ``n_experts_used`` per token
gemma3         ``qk_norm``, ``sandwich_norms``, ``activation="gelu_tanh"``, ``embed_scale``,
               ``attn_scale`` from the query pre-attention scalar, sliding-window layers
               with their own RoPE base, final soft-capping when the metadata sets it
=============  ==========================================================================

From a Hugging Face directory: llama, mistral, qwen2, qwen3 and gemma3_text (its
``layer_types``, per-layer-type ``rope_parameters`` and ``query_pre_attn_scalar``);
qwen3moe only from GGUF.

GGUF metadata that llama.cpp does not write for gemma3 (it hard-codes them) gets
llama.cpp's values: every 6th layer is global (``attention.sliding_window_pattern``
overrides), sliding layers use RoPE base 10000 (``rope.freq_base_swa`` overrides), and the
attention scale is ``head_dim**-0.5`` except for the 62-layer 27B model, where it is
``(hidden / n_heads)**-0.5`` (as in Gemma's own config, ``query_pre_attn_scalar``).
Gemma 3 has no attention soft-capping (Gemma 2 had): llama.cpp's converter asserts
``attn_logit_softcapping`` is unset and transformers' Gemma 3 attention ignores it.
Gemma's norm weights are stored in GGUF as ``1 + w`` (llama.cpp's converter adds the
one that Gemma's RMSNorm adds at run time) and kernels.weights gives them as the file
has them, so a GGUF's norms are multipliers as they are; a Hugging Face directory stores
``w``, so its gemma3_text config sets ``norm_offset`` 1 and the decoders multiply by
``norm_offset + w``, as ``Gemma3RMSNorm`` does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh")

# Hugging Face model_type -> our arch name
_HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                   "gemma3_text": "gemma3"}
GEMMA3_SWA_PATTERN = 6  # llama.cpp: every 6th layer attends globally
GEMMA3_LOCAL_ROPE_BASE = 10000.0


class UnsupportedModel(ValueError):
    """The model's architecture or layout is not one kernels can run."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # one of SUPPORTED_ARCHS
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    context_length: int
    tie_embeddings: bool
    qkv_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # -- per-architecture differences (defaults: Llama) ---------------------------------
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (qwen3, gemma3)
    sandwich_norms: bool = False  # gemma3: a norm after attention and after the MLP, before each residual add
    activation: str = "silu"  # of the MLP's gate: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: float = 1.0  # gemma3: embeddings times sqrt(hidden)
    norm_offset: float = 0.0  # RMSNorm multiplies by norm_offset + w (1: Gemma from an HF directory)
    attn_scale: float = 0.0  # attention score scale; 0 means head_dim ** -0.5
    sliding_window: int = 0  # keys a sliding layer sees, itself included (0: no sliding layers)
    sliding_layers: tuple[bool, ...] = ()  # per layer: True where the layer slides
    rope_theta_local: float = 0.0  # RoPE base of sliding layers (0: rope_theta)
    final_logit_softcap: float = 0.0  # logits = c * tanh(logits / c) when > 0
    n_experts: int = 0  # > 0: a routed MLP (qwen3moe)
    n_experts_used: int = 0  # experts per token
    expert_intermediate: int = 0  # each expert's MLP width
    expert_weights_norm: bool = False  # renormalize the chosen experts' softmax weights to sum 1

    def __post_init__(self) -> None:
        if self.attn_scale == 0.0:
            object.__setattr__(self, "attn_scale", self.head_dim ** -0.5)
        if self.rope_theta_local == 0.0:
            object.__setattr__(self, "rope_theta_local", self.rope_theta)
        if self.activation not in ACTIVATIONS:
            raise UnsupportedModel(f"activation {self.activation!r}: supported {ACTIVATIONS}")

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_window) and bool(self.sliding_layers) and self.sliding_layers[layer]

    def window(self, layer: int) -> int:
        """How many keys (itself included) a query of ``layer`` sees; 0: all before it."""
        return self.sliding_window if self.is_sliding(layer) else 0

    def rope_base(self, layer: int) -> float:
        return self.rope_theta_local if self.is_sliding(layer) else self.rope_theta

    @property
    def moe(self) -> bool:
        return self.n_experts > 0


def load_config(path: str | Path) -> ModelConfig:
    """Read the config of a ``.gguf`` file or a Hugging Face directory (config.json)."""
    path = Path(path)
    if path.is_dir():
        return config_from_hf_dir(path)
    if path.suffix == ".json":
        return config_from_hf_dir(path.parent)
    from kernels.gguf import open_gguf

    return config_from_gguf(open_gguf(path))


def config_from_gguf(gf: Any) -> ModelConfig:
    """Build a ModelConfig from an opened GGUF file (``metadata`` dict, ``tensors`` names)."""
    md = gf.metadata
    arch = md.get("general.architecture", "")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModel(f"{gf.path}: architecture {arch!r} is not supported; "
                               f"supported: {', '.join(SUPPORTED_ARCHS)}")

    def key(name: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{name}", default)
        if value is None:
            raise UnsupportedModel(f"{gf.path}: GGUF metadata lacks {arch}.{name}; "
                                   "the file is incomplete or not a model")
        return value

    def scalar(name: str, default: Any = None) -> Any:
        value = key(name, default)
        if isinstance(value, list):
            raise UnsupportedModel(f"{gf.path}: {arch}.{name} varies per layer, which is not supported")
        return value

    hidden = int(scalar("embedding_length"))
    n_heads = int(scalar("attention.head_count"))
    n_kv = int(scalar("attention.head_count_kv", n_heads))
    n_layers = int(scalar("block_count"))
    head_dim = int(md.get(f"{arch}.attention.key_length", hidden // n_heads))
    value_dim = int(md.get(f"{arch}.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise UnsupportedModel(f"{gf.path}: value heads of {value_dim} differ from key heads of "
                               f"{head_dim}, which is not supported")
    vocab = md.get(f"{arch}.vocab_size") or len(md.get("tokenizer.ggml.tokens", []))
    eos = md.get("tokenizer.ggml.eos_token_id")
    bos = md.get("tokenizer.ggml.bos_token_id")
    tensors = gf.tensors
    config: dict[str, Any] = {
        "arch": arch,
        "n_layers": n_layers,
        "hidden": hidden,
        "intermediate": int(scalar("feed_forward_length", 0)),
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "head_dim": head_dim,
        "rope_theta": float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        "rms_eps": float(scalar("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(vocab),
        "context_length": int(md.get(f"{arch}.context_length", 2048)),
        "tie_embeddings": "output.weight" not in tensors,
        "qkv_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": int(bos) if bos is not None else None,
        "eos_token_ids": (int(eos),) if eos is not None else (),
        "qk_norm": "blk.0.attn_q_norm.weight" in tensors,
        "final_logit_softcap": float(md.get(f"{arch}.final_logit_softcapping") or 0.0),
    }
    if arch == "gemma3":
        config.update(_gemma3(md, n_layers, hidden, n_heads, head_dim))
    if arch == "qwen3moe":
        config.update(_qwen3moe(gf, md))
    elif config["intermediate"] <= 0:
        raise UnsupportedModel(f"{gf.path}: GGUF metadata lacks {arch}.feed_forward_length")
    return ModelConfig(**config)


def _gemma3(md: dict[str, Any], n_layers: int, hidden: int, n_heads: int, head_dim: int) -> dict[str, Any]:
    window = int(md.get("gemma3.attention.sliding_window") or 0)
    pattern = md.get("gemma3.attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
    if isinstance(pattern, list):  # a per-layer flag: True where the layer slides
        sliding = tuple(bool(p) for p in pattern)
    else:
        sliding = tuple((i + 1) % int(pattern) != 0 for i in range(n_layers))
    scalar = hidden / n_heads if n_layers == 62 else head_dim
    return {
        "sandwich_norms": True, "activation": "gelu_tanh", "embed_scale": math.sqrt(hidden),
        "attn_scale": scalar ** -0.5, "sliding_window": window, "sliding_layers": sliding if window else (),
        "rope_theta_local": float(md.get("gemma3.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)),
    }


def _qwen3moe(gf: Any, md: dict[str, Any]) -> dict[str, Any]:
    def need(name: str) -> int:
        value = md.get(f"qwen3moe.{name}")
        if not value:
            raise UnsupportedModel(f"{gf.path}: GGUF metadata lacks qwen3moe.{name}")
        return int(value)

    gating = md.get("qwen3moe.expert_gating_func", 1)  # llama.cpp: 1 softmax, 2 sigmoid
    if gating != 1:
        raise UnsupportedModel(f"{gf.path}: expert gating function {gating} is not supported (softmax only)")
    if "blk.0.ffn_gate_inp.weight" not in gf.tensors:
        raise UnsupportedModel(f"{gf.path}: qwen3moe file without router tensors (ffn_gate_inp)")
    # llama.cpp's qwen3moe graph always renormalizes the top-k weights (norm_topk_prob)
    return {
        "n_experts": need("expert_count"), "n_experts_used": need("expert_used_count"),
        "expert_intermediate": need("expert_feed_forward_length"),
        "expert_weights_norm": bool(md.get("qwen3moe.expert_weights_norm", True)),
    }


def config_from_hf_dir(directory: Path) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face model directory."""
    cfg_path = directory / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UnsupportedModel(f"{cfg_path}: cannot read config.json ({exc})") from exc
    model_type = cfg.get("model_type", "")
    if model_type not in _HF_MODEL_TYPES:
        raise UnsupportedModel(f"{cfg_path}: model_type {model_type!r} is not supported from a Hugging Face "
                               f"directory; supported: {', '.join(_HF_MODEL_TYPES)} (use the model's GGUF "
                               "file for the others)")
    if cfg.get("rope_scaling") or any((p or {}).get("rope_type", "default") != "default"
                                      for p in _rope_parameters(cfg).values()):
        raise UnsupportedModel(f"{cfg_path}: RoPE scaling is not supported")
    n_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    eos = cfg.get("eos_token_id")
    gen_path = directory / "generation_config.json"
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    extra = _gemma3_hf(cfg, cfg_path) if model_type == "gemma3_text" else {}
    return ModelConfig(**{**dict(  # noqa: C408 (ModelConfig's own keywords, then the architecture's)
        arch=_HF_MODEL_TYPES[model_type],
        n_layers=int(cfg["num_hidden_layers"]),
        hidden=hidden,
        intermediate=int(cfg["intermediate_size"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or hidden // n_heads),
        rope_theta=float(rope_theta),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        vocab_size=int(cfg["vocab_size"]),
        context_length=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        qk_norm=model_type == "qwen3",
    ), **extra})


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's per-layer-type RoPE parameters ({} for a flat ``rope_theta``)."""
    params = cfg.get("rope_parameters") or {}
    return {k: v for k, v in params.items() if isinstance(v, dict)}


def _gemma3_hf(cfg: dict[str, Any], cfg_path: Path) -> dict[str, Any]:
    """Gemma 3's differences from its config.json (text model): the norms there are
    ``w``, as Gemma3RMSNorm multiplies by ``1 + w``."""
    if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UnsupportedModel(f"{cfg_path}: hidden_activation {cfg['hidden_activation']!r} is not supported")
    n_layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % int(cfg.get("sliding_window_pattern", GEMMA3_SWA_PATTERN)) == 0
        else "sliding_attention" for i in range(n_layers)]
    rope = _rope_parameters(cfg)
    global_theta = rope.get("full_attention", {}).get("rope_theta") or cfg.get("rope_theta", 1_000_000.0)
    local_theta = (rope.get("sliding_attention", {}).get("rope_theta")
                   or cfg.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE_BASE))
    window = int(cfg.get("sliding_window") or 0)
    return {
        "sandwich_norms": True, "activation": "gelu_tanh", "embed_scale": math.sqrt(hidden), "norm_offset": 1.0,
        "qk_norm": True, "rope_theta": float(global_theta), "rope_theta_local": float(local_theta),
        "attn_scale": float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        "sliding_window": window,
        "sliding_layers": tuple(t == "sliding_attention" for t in types) if window else (),
        "final_logit_softcap": float(cfg.get("final_logit_softcapping") or 0.0),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", True)),
    }
