"""Architecture hyper-parameters of a Llama-family model, from GGUF metadata or config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")


class UnsupportedModel(ValueError):
    """The model's architecture or layout is not one kernels can run."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "mistral" | "qwen2"
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
    """Build a ModelConfig from an opened ``kernels.gguf.GGUFFile``."""
    md = gf.metadata
    arch = md.get("general.architecture", "")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModel(f"{gf.path}: architecture {arch!r} is not supported; "
                               f"supported: {', '.join(SUPPORTED_ARCHS)}")

    def key(name: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{name}", default)
        if value is None:
            raise UnsupportedModel(f"{gf.path}: GGUF metadata lacks {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    n_kv = key("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise UnsupportedModel(f"{gf.path}: per-layer head counts are not supported")
    head_dim = int(md.get(f"{arch}.attention.key_length", hidden // n_heads))
    vocab = md.get(f"{arch}.vocab_size") or len(md.get("tokenizer.ggml.tokens", []))
    eos = md.get("tokenizer.ggml.eos_token_id")
    eos_ids = (int(eos),) if eos is not None else ()
    bos = md.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        arch=arch,
        n_layers=int(key("block_count")),
        hidden=hidden,
        intermediate=int(key("feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=head_dim,
        rope_theta=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(key("attention.layer_norm_rms_epsilon")),
        vocab_size=int(vocab),
        context_length=int(md.get(f"{arch}.context_length", 2048)),
        tie_embeddings="output.weight" not in gf.tensors,
        qkv_bias="blk.0.attn_q.bias" in gf.tensors,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
    )


def config_from_hf_dir(directory: Path) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face model directory."""
    cfg_path = directory / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UnsupportedModel(f"{cfg_path}: cannot read config.json ({exc})") from exc
    model_type = cfg.get("model_type", "")
    if model_type not in SUPPORTED_ARCHS:
        raise UnsupportedModel(f"{cfg_path}: model_type {model_type!r} is not supported; "
                               f"supported: {', '.join(SUPPORTED_ARCHS)}")
    if cfg.get("rope_scaling"):
        raise UnsupportedModel(f"{cfg_path}: rope_scaling is not supported")
    n_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    eos = cfg.get("eos_token_id")
    gen_path = directory / "generation_config.json"
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        arch=model_type,
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
    )
