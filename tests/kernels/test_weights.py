"""A stage loads exactly its own tensors, with HF names and layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernels import gguf as gguf_mod
from kernels.config import load_config
from kernels.stage import StageSpec, load_stage
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


def test_quant_mode_keeps_blocks(model_path: Path):
    f32 = load_weights(model_path, StageSpec(2, 3, head=True), "float32")
    q = load_weights(model_path, StageSpec(2, 3, head=True), "quant")
    for name, t in q.tensors.items():
        if isinstance(t, QuantTensor):
            assert t.qs.shape == t.shape and t.scale.shape == (t.shape[0], t.shape[1] // 32)
            np.testing.assert_array_equal(t.dequantize(), f32.tensors[name], err_msg=name)
    qq = q.tensors["model.layers.2.self_attn.q_proj.weight"]
    assert qq.type_name == "Q4_1" and qq.qs.max() <= 15 and qq.min is not None
    assert q.tensors["lm_head.weight"].type_name == "Q8_0"  # the tied Q8_0 embedding
    assert q.source_digest == f32.source_digest


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
