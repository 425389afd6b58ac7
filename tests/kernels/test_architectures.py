"""Every architecture against transformers, on tiny random GGUF files built in the test (no download).

For each model of tests/kernels/synthetic.py (llama with K-quants, mistral, qwen3,
qwen3moe, gemma3 with sliding layers, gemma3 with soft-capping), transformers loads the
same GGUF in float32 and is the reference:

- torch float32: the logits of every prompt position within LOGIT_ATOL, and greedy
  tokens equal for GREEDY_STEPS steps (ours decode with the KV cache, the reference
  recomputes the whole sequence each step);
- MLX float32 against torch: logits within LOGIT_ATOL, greedy tokens equal, and seeded
  sampling gives the same tokens.

Where transformers' GGUF loader falls short, the test says so and works around it:

- mistral: a GGUF of architecture ``llama`` named "mistral" makes transformers 5.x
  build a Mistral model and then fail ("Unknown gguf model_type: mistral in gguf-py"),
  so the reference is ``MistralForCausalLM`` built from the config and state_dict that
  transformers reads from a twin file (same seed, same tensors, named otherwise);
- qwen3moe: ``expert_feed_forward_length`` is not read (moe_intermediate_size stays at
  its default 768), so it is passed to ``from_pretrained``;
- gemma3: ``final_logit_softcapping`` is not read from GGUF either; the soft-capped
  variant passes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kernels.config import load_config
from kernels.loader import load_stage
from kernels.sampling import GREEDY, SamplingParams, sample
from kernels.stage import Stage, StageSpec, StepInput
from tests.kernels.synthetic import TINY, tiny, write_tiny_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

MODELS = {**TINY, "gemma3-softcap": tiny("gemma3", final_logit_softcap=5.0)}
KINDS = list(MODELS)
PROMPT = np.array([1, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11, 300], dtype=np.int64)  # > gemma3's window of 4
GREEDY_STEPS = 10
SAMPLED_STEPS = 16
# float32, ours vs transformers and MLX vs torch: measured 0.0 (torch) and <= 2.1e-5 (MLX)
# on these models, whose logits reach 2-55
LOGIT_ATOL = 1e-3
# torch quant (int8 rows, bfloat16 activations) vs transformers float32: max |diff| / max |logit|,
# measured 0.011-0.015 (llama, mistral, qwen3, qwen3moe), 0.056 (gemma3) and 0.12 (gemma3 with
# its logits capped at 5, which shrinks the denominator)
QUANT_MAX_REL = 0.15

_built: dict[str, Path] = {}
_stages: dict[tuple[str, str, str], Stage] = {}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


def model_file(model_dir: Path, kind: str) -> Path:
    if kind not in _built:
        (model_dir / kind).mkdir()
        _built[kind] = write_tiny_gguf(model_dir / kind / "model.gguf", MODELS[kind])
    return _built[kind]


def stage(model_dir: Path, kind: str, backend: str = "torch", mode: str = "float32") -> Stage:
    key = (kind, backend, mode)
    if key not in _stages:
        path = model_file(model_dir, kind)
        _stages[key] = load_stage(path, StageSpec.full(load_config(path).n_layers), backend, mode)
    return _stages[key]


def reference(model_dir: Path, kind: str):
    """transformers' model of the same file, float32."""
    transformers.logging.set_verbosity_error()
    path = model_file(model_dir, kind)
    cfg = load_config(path)
    kwargs = {}
    if kind == "qwen3moe":
        kwargs["moe_intermediate_size"] = cfg.expert_intermediate
    if cfg.final_logit_softcap:
        kwargs["final_logit_softcapping"] = cfg.final_logit_softcap
    if kind == "mistral":
        twin_dir = model_dir / "mistral-twin"
        twin_dir.mkdir(exist_ok=True)
        twin = write_tiny_gguf(twin_dir / "model.gguf", tiny("mistral", name="twin"))
        llama = transformers.AutoModelForCausalLM.from_pretrained(twin_dir, gguf_file=twin.name,
                                                                  dtype=torch.float32)
        lc = llama.config
        config = transformers.MistralConfig(
            vocab_size=lc.vocab_size, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
            num_hidden_layers=lc.num_hidden_layers, num_attention_heads=lc.num_attention_heads,
            num_key_value_heads=lc.num_key_value_heads, head_dim=lc.head_dim, rms_norm_eps=lc.rms_norm_eps,
            max_position_embeddings=lc.max_position_embeddings, rope_theta=cfg.rope_theta,
            tie_word_embeddings=lc.tie_word_embeddings, sliding_window=None)
        model = transformers.MistralForCausalLM(config)
        model.load_state_dict(llama.state_dict())
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32, **kwargs)
    return model.eval()


def greedy(st: Stage, ids: np.ndarray, steps: int, session: str,
           params: SamplingParams = GREEDY) -> tuple[list[int], list[np.ndarray]]:
    logits = st.forward([StepInput(session, 0, tokens=ids)])[0]
    tokens, rows = [], []
    for i in range(steps):
        rows.append(logits[0])
        tokens.append(sample(logits[0], params, len(ids) + i))
        logits = st.forward([StepInput(session, len(ids) + i, tokens=np.array([tokens[-1]]))])[0]
    st.free(session)
    return tokens, rows


@pytest.mark.parametrize("kind", KINDS)
def test_torch_matches_transformers(model_dir, kind):
    model = reference(model_dir, kind)
    ours_stage = stage(model_dir, kind)
    if kind == "mistral":
        assert type(model).__name__ == "MistralForCausalLM"
        twin = load_stage(model_dir / "mistral-twin" / "model.gguf", ours_stage.spec)
        assert twin.weights_digest == ours_stage.weights_digest  # the same tensors
    with torch.inference_mode():
        ref = model(torch.tensor(PROMPT)[None]).logits[0].numpy()
    ours = ours_stage.forward([StepInput("all", 0, tokens=PROMPT)], all_logits=True)[0]
    ours_stage.free("all")
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=LOGIT_ATOL, rtol=0)

    tokens, _ = greedy(ours_stage, PROMPT, GREEDY_STEPS, "g")
    seq = list(PROMPT)
    with torch.inference_mode():
        for _ in range(GREEDY_STEPS):
            seq.append(int(model(torch.tensor(seq)[None]).logits[0, -1].argmax()))
    assert tokens == seq[len(PROMPT):]

    quant = stage(model_dir, kind, "torch", "quant")
    q = quant.forward([StepInput("q", 0, tokens=PROMPT)], all_logits=True)[0]
    quant.free("q")
    assert np.abs(q - ref).max() / np.abs(ref).max() < QUANT_MAX_REL


@pytest.mark.parametrize("kind", KINDS)
def test_mlx_matches_torch_greedy_and_seeded_sampling(model_dir, kind):
    pytest.importorskip("mlx.core")
    ref_stage, ours_stage = stage(model_dir, kind), stage(model_dir, kind, "mlx")
    ref = ref_stage.forward([StepInput("all", 0, tokens=PROMPT)], all_logits=True)[0]
    ours = ours_stage.forward([StepInput("all", 0, tokens=PROMPT)], all_logits=True)[0]
    ref_stage.free("all")
    ours_stage.free("all")
    np.testing.assert_allclose(ours, ref, atol=LOGIT_ATOL, rtol=0)
    # random models' logits span 2-55: a temperature of a quarter of the span really samples
    sampling = SamplingParams(temperature=float(np.ptp(ref[-1])) / 4, seed=7)
    for params, steps in ((GREEDY, GREEDY_STEPS), (sampling, SAMPLED_STEPS)):
        ref_tokens, ref_rows = greedy(ref_stage, PROMPT, steps, "s", params)
        our_tokens, our_rows = greedy(ours_stage, PROMPT, steps, "s", params)
        for a, b in zip(our_rows, ref_rows):
            np.testing.assert_allclose(a, b, atol=LOGIT_ATOL, rtol=0)
        assert our_tokens == ref_tokens, params
    # not just the greedy path
    assert any(t != int(np.argmax(r)) for t, r in zip(ref_tokens, ref_rows))


def test_gemma3_config_from_metadata(model_dir):
    c = load_config(model_file(model_dir, "gemma3"))
    assert c.arch == "gemma3" and c.n_layers == 6 and c.head_dim == 256
    assert c.sliding_layers == (True,) * 5 + (False,) and c.sliding_window == 4
    assert c.window(0) == 4 and c.window(5) == 0
    assert c.rope_base(0) == 10000.0 and c.rope_base(5) == 1_000_000.0
    assert c.embed_scale == 16.0 and c.attn_scale == 256 ** -0.5
    assert c.qk_norm and c.sandwich_norms and c.activation == "gelu_tanh" and c.tie_embeddings
    capped = load_config(model_file(model_dir, "gemma3-softcap"))
    assert capped.final_logit_softcap == 5.0


def test_gemma3_metadata_overrides_llama_cpp_defaults(tmp_path):
    path = write_tiny_gguf(tmp_path / "g.gguf", tiny("gemma3", n_layers=4, extra={
        "attention.sliding_window_pattern": 2, "rope.freq_base_swa": 5000.0}))
    c = load_config(path)
    assert c.sliding_layers == (True, False, True, False) and c.rope_base(0) == 5000.0


def test_qwen3moe_config_from_metadata(model_dir):
    c = load_config(model_file(model_dir, "qwen3moe"))
    assert (c.n_experts, c.n_experts_used, c.expert_intermediate) == (6, 2, 64)
    assert c.expert_weights_norm and c.qk_norm and c.moe


def test_incomplete_or_unknown_architectures_say_what_is_missing(tmp_path):
    from types import SimpleNamespace

    from kernels.config import UnsupportedModel, config_from_gguf
    from kernels.gguf import open_gguf

    gf = open_gguf(write_tiny_gguf(tmp_path / "moe.gguf", TINY["qwen3moe"]))
    metadata = {k: v for k, v in gf.metadata.items() if k != "qwen3moe.expert_feed_forward_length"}
    with pytest.raises(UnsupportedModel, match="qwen3moe.expert_feed_forward_length"):
        config_from_gguf(SimpleNamespace(path=gf.path, metadata=metadata, tensors=gf.tensors))
    metadata = {**gf.metadata, "general.architecture": "gemma2"}
    with pytest.raises(UnsupportedModel, match="'gemma2' is not supported"):
        config_from_gguf(SimpleNamespace(path=gf.path, metadata=metadata, tensors=gf.tensors))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "qwen3_moe"}')
    with pytest.raises(UnsupportedModel, match="use the model's GGUF file"):
        load_config(tmp_path / "hf")


@pytest.mark.parametrize("kind", ["qwen3", "qwen3moe", "gemma3"])
def test_mixed_torch_mlx_pipeline_equals_one_stage(model_dir, kind):
    """Layers split between the backends, hidden states crossing as float32 numpy: the
    same logits as one torch stage, prefill and a decode step (gemma3's split puts sliding
    layers on both sides)."""
    pytest.importorskip("mlx.core")
    path = model_file(model_dir, kind)
    n = load_config(path).n_layers
    first = load_stage(path, StageSpec(0, n // 2, embed=True), "torch")
    second = load_stage(path, StageSpec(n // 2, n, head=True), "mlx")
    full = stage(model_dir, kind)
    for pos, ids in ((0, PROMPT), (len(PROMPT), np.array([5]))):
        hidden = first.forward([StepInput("p", pos, tokens=ids)])[0]
        logits = second.forward([StepInput("p", pos, hidden=hidden)])[0]
        ref = full.forward([StepInput("p", pos, tokens=ids)])[0]
        np.testing.assert_allclose(logits, ref, atol=LOGIT_ATOL, rtol=0)
    full.free("p")
