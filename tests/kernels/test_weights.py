"""A stage loads exactly its own tensors, with HF names and layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernels import gguf as gguf_mod
from kernels.config import load_config
from kernels.loader import load_stage
from kernels.stage import StageSpec
from kernels.weights import QuantTensor, load_weights

H, FF, NH, NKV, HD, V = 576, 1536, 9, 3, 64, 49152
LAYER_PARAMS = 2 * H + H * NH * HD + 2 * H * NKV * HD + NH * HD * H + 3 * H * FF
EMBED_PARAMS = V * H


@pytest.mark.parametrize("spec", [StageSpec(0, 30, True, True), StageSpec(4, 9), StageSpec(0, 3, embed=True),
                                  StageSpec(27, 30, head=True), StageSpec(5, 5, head=True)])
def test_stage_holds_exactly_its_layers(model_path: Path, spec: StageSpec):
    w = load_weights(model_path, spec, "float32")
    layers = {int(n.split(".")[2]) for n in w.tensors if n.startswith("model.layers.")}
    assert layers == set(spec.layers())
    assert ("model.embed_tokens.weight" in w.tensors) == spec.embed
    assert ("lm_head.weight" in w.tensors) == spec.head
    assert ("model.norm.weight" in w.tensors) == spec.head
    n_layers = spec.end - spec.start
    # a tied head that also embeds shares the embedding (counted once)
    embed_like = int(spec.embed) + int(spec.head) - int(spec.embed and spec.head)
    expected = n_layers * LAYER_PARAMS + embed_like * EMBED_PARAMS + int(spec.head) * H
    assert w.n_params() == expected
    assert all(t.dtype == np.float32 for t in w.tensors.values())
    st = load_stage(model_path, spec, "torch", "float32")
    assert st.param_bytes == 4 * expected


def test_only_needed_tensors_are_read(model_path: Path, monkeypatch):
    touched: list[str] = []
    original = gguf_mod.GGUFFile.raw

    def spy(self, name):
        touched.append(name)
        return original(self, name)

    monkeypatch.setattr(gguf_mod.GGUFFile, "raw", spy)
    load_weights(model_path, StageSpec(10, 12), "quant")
    assert touched and all(n.startswith(("blk.10.", "blk.11.")) for n in touched)
    assert len(touched) == 2 * 9


def test_quant_mode_keeps_the_files_bytes(model_path: Path):
    f32 = load_weights(model_path, StageSpec(2, 3, head=True), "float32")
    q = load_weights(model_path, StageSpec(2, 3, head=True), "quant")
    gf = gguf_mod.open_gguf(model_path)
    for name, t in q.tensors.items():
        if isinstance(t, QuantTensor):  # q/k rows un-permuted as blocks, then decoded: as float32 mode
            np.testing.assert_array_equal(t.dequantize(), f32.tensors[name], err_msg=name)
    qq = q.tensors["model.layers.2.self_attn.q_proj.weight"]
    assert qq.type_name == "Q4_1" and qq.nbytes == gf.tensors["blk.2.attn_q.weight"].nbytes
    assert q.tensors["lm_head.weight"].type_name == "Q8_0"  # the tied Q8_0 embedding
    assert q.source_digest == f32.source_digest
    in_range = [n for n in gf.tensors if n.startswith("blk.2.")] + ["output_norm.weight", "token_embd.weight"]
    assert q.file_bytes() == f32.file_bytes() == sum(gf.tensors[n].nbytes for n in in_range)


@pytest.mark.parametrize("backend, bound", [("torch", 1.0), ("mlx", 1.2)])
def test_quant_stage_holds_about_the_files_bytes(model_path: Path, backend: str, bound: float):
    """Q4_1 layers: torch's int4 (0.5 byte + bfloat16 scale and zero per 32) is the file's
    20 bytes per 32 exactly; MLX keeps float32 scales and biases (24 bytes per 32)."""
    spec = StageSpec(4, 9)
    file_bytes = load_weights(model_path, spec, "quant").file_bytes()
    held = load_stage(model_path, spec, backend, "quant").param_bytes
    assert file_bytes * 0.95 <= held <= file_bytes * bound * 1.001


@pytest.mark.slow
def test_qk_rows_are_in_hf_layout(model_path: Path, hf_reference):
    model, _ = hf_reference
    sd = model.state_dict()
    w = load_weights(model_path, StageSpec(7, 8), "float32")
    for name, t in w.tensors.items():
        np.testing.assert_array_equal(t, sd[name].numpy(), err_msg=name)


def test_config_matches_spec_bounds(model_path: Path):
    from kernels.stage import StageInputError

    with pytest.raises(StageInputError):
        load_weights(model_path, StageSpec(20, 31), "float32")
    assert load_config(model_path).n_layers == 30


def _tiny_llama(path: Path, ffn_down_type: str) -> None:
    """A one-layer llama GGUF with random weights; ffn_down stored as ``ffn_down_type``."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 1, "embedding_length": 256, "feed_forward_length": 256,
                       "attention.head_count": 4, "attention.head_count_kv": 4, "context_length": 64}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("llama.vocab_size", 32)
    names = {"token_embd.weight": (32, 256), "output_norm.weight": (256,), "blk.0.attn_norm.weight": (256,),
             "blk.0.ffn_norm.weight": (256,), "blk.0.attn_q.weight": (256, 256), "blk.0.attn_k.weight": (256, 256),
             "blk.0.attn_v.weight": (256, 256), "blk.0.attn_output.weight": (256, 256),
             "blk.0.ffn_gate.weight": (256, 256), "blk.0.ffn_up.weight": (256, 256)}
    for name, shape in names.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ffn_down_type]]
    w.add_tensor("blk.0.ffn_down.weight", np.zeros((256, 256 // block * size), dtype=np.uint8),
                 raw_shape=(256, 256 // block * size), raw_dtype=gguf.GGMLQuantizationType[ffn_down_type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("mode", ["float32", "quant"])
def test_unsupported_tensor_type_is_refused_before_reading(tmp_path: Path, mode: str, monkeypatch):
    path = tmp_path / "tiny-q8k.gguf"
    _tiny_llama(path, "Q8_K")
    touched: list[str] = []
    original = gguf_mod.GGUFFile.raw
    monkeypatch.setattr(gguf_mod.GGUFFile, "raw", lambda self, name: touched.append(name) or original(self, name))
    with pytest.raises(gguf_mod.UnsupportedTensorType, match="blk.0.ffn_down.weight.*Q8_K") as err:
        load_stage(path, StageSpec.full(1), "torch", mode)
    assert "\n" not in str(err.value) and touched == []
    _tiny_llama(path, "Q6_K")  # the same file with a type the library dequantizes loads
    assert load_stage(path, StageSpec.full(1), "torch", mode).param_bytes > 0


@pytest.mark.slow
def test_quant_stage_bytes_on_a_q4_k_m_file():
    """Qwen2.5-Coder-0.5B Q4_K_M (mostly Q5_0, which torch holds as per-row int8): a layer
    range holds at most 1.4x the file's bytes (measured 1.37x), not float32's ~6x."""
    from mesh import models

    path = models.resolve("qwen2.5-coder-0.5b", fetch=True)
    spec = StageSpec(10, 13)
    file_bytes = load_weights(path, spec, "quant").file_bytes()
    held = load_stage(path, spec, "torch", "quant").param_bytes
    assert file_bytes <= held <= 1.4 * file_bytes
