"""Hugging Face directories (config.json + sharded safetensors) on tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernels.config import load_config
from kernels.loader import load_stage
from kernels.safetensors import SafetensorsDir, SafetensorsError
from kernels.stage import StageSpec, StepInput

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny(tmp_path: Path, kind: str, tied: bool) -> tuple[Path, object]:
    common = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "rope_theta": 10000.0, "tie_word_embeddings": tied}
    torch.manual_seed(0)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "gemma3":
        # 6 layers: the 6th is global; a window of 4 that the test's 6 ids cross
        cfg = transformers.Gemma3TextConfig(**{**common, "num_hidden_layers": 6}, head_dim=32, sliding_window=4,
                                            query_pre_attn_scalar=24)
        model = transformers.Gemma3ForCausalLM(cfg)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # HF's w, used as 1 + w: zeros would hide a missed offset
                p.data.normal_(0.0, 0.3)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32)
        model = transformers.Qwen3ForCausalLM(cfg)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones, so that a missed QK-norm shows
                p.data.normal_(1.0, 0.2)
    else:
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    model.eval()
    out = tmp_path / kind
    model.save_pretrained(out, max_shard_size="50KB", safe_serialization=True)
    return out, model


@pytest.mark.parametrize("kind,tied", [("llama", False), ("qwen2", True), ("qwen3", True), ("gemma3", True)])
def test_hf_directory_matches_transformers(tmp_path: Path, kind: str, tied: bool):
    path, model = _tiny(tmp_path, kind, tied)
    assert (path / "model.safetensors.index.json").exists()  # sharded
    cfg = load_config(path)
    assert cfg.arch == kind and cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == tied
    assert cfg.qk_norm == (kind in ("qwen3", "gemma3"))
    ids = np.array([5, 17, 42, 99, 3, 250], dtype=np.int64)
    with torch.inference_mode():
        ref = model(torch.tensor(ids)[None]).logits[0].numpy()
    st = load_stage(path, StageSpec.full(cfg.n_layers), "torch", "float32")
    ours = st.forward([StepInput("s", 0, tokens=ids)], all_logits=True)[0]
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    quant = load_stage(path, StageSpec.full(cfg.n_layers), "torch", "quant")
    q = quant.forward([StepInput("s", 0, tokens=ids)], all_logits=True)[0]
    assert np.abs(q - ref).max() / np.abs(ref).max() < 0.1


def test_corrupt_safetensors_gives_typed_error(tmp_path: Path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(SafetensorsError):
        SafetensorsDir(tmp_path)
    with pytest.raises(SafetensorsError):
        SafetensorsDir(tmp_path / "nowhere")
