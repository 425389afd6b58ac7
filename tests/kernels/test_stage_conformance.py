"""Conformance suite every kernels backend must pass (the Stage contract in kernels/stage.py),
on every architecture: the default model (llama) and tiny random qwen3, qwen3moe and gemma3
files (tests/kernels/synthetic.py; gemma3's with sliding layers of window 4, so that the
prompts here cross it).

Add a backend by appending its name to BACKENDS, an architecture to ARCHS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernels.config import load_config
from kernels.loader import load_stage
from kernels.stage import StageInputError, StageSpec, StepInput
from tests.kernels.synthetic import TINY, write_tiny_gguf

BACKENDS = ["torch", "mlx"]
ARCHS = ["smollm2", "qwen3", "qwen3moe", "gemma3"]  # smollm2: the default model (llama)

# batched vs one-by-one: same math, different matmul shapes -> tiny float differences
BATCH_ATOL = {"float32": 1e-4, "quant": 5e-2}
# a 3-stage pipeline vs the full model in float32 (hidden states cross as float32 numpy)
PIPELINE_ATOL = 1e-4

_cache: dict = {}


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=ARCHS)
def arch_path(request, model_path: Path, tmp_path_factory) -> Path:
    if request.param == "smollm2":
        return model_path
    return write_tiny_gguf(tmp_path_factory.mktemp(request.param) / "model.gguf", TINY[request.param])


@pytest.fixture
def stage_of(arch_path: Path, backend: str):
    def get(spec: StageSpec, mode: str = "float32"):
        key = (arch_path, backend, spec, mode)
        if key not in _cache:
            _cache[key] = load_stage(arch_path, spec, backend, mode)
        return _cache[key]

    return get


@pytest.fixture(scope="module")
def n_layers(arch_path: Path) -> int:
    return load_config(arch_path).n_layers


@pytest.fixture(scope="module")
def ids(arch_path: Path):
    """``ids(n, offset)``: n token ids spread over the model's vocabulary."""
    span = min(load_config(arch_path).vocab_size, 40010) - 10
    return lambda n, offset=0: (np.arange(n, dtype=np.int64) * 37 + 100 + offset) % span + 10


def test_full_stage_shapes_and_cache(stage_of, n_layers, ids):
    st = stage_of(StageSpec.full(n_layers))
    cfg = st.config
    out = st.forward([StepInput("s", 0, tokens=ids(7))])[0]
    assert out.shape == (1, cfg.vocab_size) and out.dtype == np.float32
    assert st.cache_len("s") == 7
    out = st.forward([StepInput("s", 7, tokens=ids(1))])[0]
    assert out.shape == (1, cfg.vocab_size)
    assert st.cache_len("s") == 8
    allx = st.forward([StepInput("t", 0, tokens=ids(5))], all_logits=True)[0]
    assert allx.shape == (5, cfg.vocab_size)
    st.free("s")
    st.free("t")
    assert st.cache_len("s") == 0
    assert st.backend in ("torch", "mlx")
    assert st.param_bytes > 0 and len(st.weights_digest) == 32


def test_logit_rows_pick_rows_of_all_logits(stage_of, n_layers, ids):
    st = stage_of(StageSpec.full(n_layers))
    allx = st.forward([StepInput("lr-a", 0, tokens=ids(6))], all_logits=True)[0]
    picked, other = st.forward([StepInput("lr-b", 0, tokens=ids(6), logit_rows=(1, 4, 5)),
                                StepInput("lr-c", 0, tokens=ids(3), logit_rows=(0,))])
    assert picked.shape == (3, st.config.vocab_size) and other.shape == (1, st.config.vocab_size)
    np.testing.assert_allclose(picked, allx[[1, 4, 5]], atol=1e-4)
    np.testing.assert_allclose(other, allx[[0]], atol=1e-4)  # same first 3 ids, row 0
    with pytest.raises(StageInputError):
        st.forward([StepInput("lr-d", 0, tokens=ids(2), logit_rows=(2,))])
    for s in ("lr-a", "lr-b", "lr-c", "lr-d"):
        st.free(s)


def test_pipeline_of_three_stages_equals_full(stage_of, n_layers, ids):
    a, b = n_layers // 3, 2 * n_layers // 3
    first = stage_of(StageSpec(0, a, embed=True))
    mid = stage_of(StageSpec(a, b))
    last = stage_of(StageSpec(b, n_layers, head=True))
    full = stage_of(StageSpec.full(n_layers))
    ids = ids(9)
    h1 = first.forward([StepInput("p", 0, tokens=ids)])[0]
    assert h1.shape == (9, full.config.hidden) and h1.dtype == np.float32
    h2 = mid.forward([StepInput("p", 0, hidden=h1)])[0]
    logits = last.forward([StepInput("p", 0, hidden=h2)])[0]
    ref = full.forward([StepInput("p", 0, tokens=ids)])[0]
    np.testing.assert_allclose(logits, ref, atol=PIPELINE_ATOL, rtol=0)
    # one decode step through the pipeline
    tok = np.array([int(np.argmax(ref[0]))])
    h1 = first.forward([StepInput("p", 9, tokens=tok)])[0]
    h2 = mid.forward([StepInput("p", 9, hidden=h1)])[0]
    logits = last.forward([StepInput("p", 9, hidden=h2)])[0]
    ref = full.forward([StepInput("p", 9, tokens=tok)])[0]
    np.testing.assert_allclose(logits, ref, atol=PIPELINE_ATOL, rtol=0)
    for st in (first, mid, last, full):
        st.free("p")


@pytest.mark.parametrize("mode", ["float32", "quant"])
def test_batched_decode_equals_sessions_alone(stage_of, n_layers, ids, mode):
    st = stage_of(StageSpec.full(n_layers), mode)
    prompts = [ids(3, 1), ids(11, 2), ids(6, 3)]
    steps = 4

    def run_alone(i: int) -> tuple[list[int], list[np.ndarray]]:
        name = f"alone{i}"
        logits = st.forward([StepInput(name, 0, tokens=prompts[i])])[0]
        toks, rows = [], []
        for s in range(steps):
            tok = int(np.argmax(logits[0]))
            toks.append(tok)
            logits = st.forward([StepInput(name, len(prompts[i]) + s, tokens=np.array([tok]))])[0]
            rows.append(logits[0])
        st.free(name)
        return toks, rows

    alone = [run_alone(i) for i in range(3)]
    # batched: prefill each, then one forward call per step carrying all three sessions
    last = [st.forward([StepInput(f"b{i}", 0, tokens=p)])[0] for i, p in enumerate(prompts)]
    toks: list[list[int]] = [[], [], []]
    for s in range(steps):
        items = []
        for i in range(3):
            tok = int(np.argmax(last[i][0]))
            toks[i].append(tok)
            items.append(StepInput(f"b{i}", len(prompts[i]) + s, tokens=np.array([tok])))
        last = st.forward(items)
        for i in range(3):
            np.testing.assert_allclose(last[i][0], alone[i][1][s], atol=BATCH_ATOL[mode], rtol=0)
    assert toks == [a[0] for a in alone]
    for i in range(3):
        assert st.cache_len(f"b{i}") == len(prompts[i]) + steps
        st.free(f"b{i}")


def test_mixed_prefill_and_decode_in_one_call(stage_of, n_layers, ids):
    st = stage_of(StageSpec.full(n_layers))
    a = st.forward([StepInput("m1", 0, tokens=ids(5))])[0]
    ref_decode = st.forward([StepInput("m1", 5, tokens=ids(1))])[0]
    ref_prefill = st.forward([StepInput("m2", 0, tokens=ids(8, 5))])[0]
    st.free("m2")
    out = st.forward([StepInput("m2", 0, tokens=ids(8, 5)), StepInput("m1", 5, tokens=ids(1))])
    np.testing.assert_allclose(out[0], ref_prefill, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out[1], ref_decode, atol=1e-4, rtol=0)
    assert a.shape == out[1].shape
    st.free("m1")
    st.free("m2")


def test_truncation_replay_equals_original(stage_of, n_layers, ids):
    st = stage_of(StageSpec.full(n_layers))
    prompt = ids(6)
    st.forward([StepInput("r", 0, tokens=prompt)])
    generated = [11, 22, 33, 44]
    original = []
    for i, tok in enumerate(generated):
        original.append(st.forward([StepInput("r", 6 + i, tokens=np.array([tok]))])[0])
    assert st.cache_len("r") == 10
    # replay from position 7 (as after a failover): the cache is truncated, then extended
    replay = st.forward([StepInput("r", 7, tokens=np.array(generated[1:]))], all_logits=True)[0]
    assert st.cache_len("r") == 10
    for i in range(3):
        np.testing.assert_allclose(replay[i], original[i + 1][0], atol=1e-4, rtol=0)
    # replay one token at a time from further back
    again = st.forward([StepInput("r", 8, tokens=np.array([generated[2]]))])[0]
    np.testing.assert_allclose(again, original[2], atol=1e-4, rtol=0)
    assert st.cache_len("r") == 9
    st.free("r")


def test_invalid_inputs_raise_typed_errors(stage_of, n_layers, ids):
    st = stage_of(StageSpec.full(n_layers))
    mid = stage_of(StageSpec(1, 2))
    with pytest.raises(StageInputError):
        st.forward([StepInput("e", 3, tokens=ids(2))])  # past the cached length (0)
    with pytest.raises(StageInputError):
        st.forward([StepInput("e", 0, hidden=np.zeros((1, st.config.hidden), np.float32))])
    with pytest.raises(StageInputError):
        mid.forward([StepInput("e", 0, tokens=ids(2))])
    with pytest.raises(StageInputError):
        st.forward([StepInput("e", 0, tokens=ids(1)), StepInput("e", 0, tokens=ids(1))])
    assert st.cache_len("e") == 0


def test_weights_digest_names_the_weights_not_the_mode(stage_of, n_layers, ids):
    f = stage_of(StageSpec(0, 2, embed=True))
    q = stage_of(StageSpec(0, 2, embed=True), "quant")
    other = stage_of(StageSpec(1, 2))
    assert f.weights_digest == q.weights_digest
    assert f.weights_digest != other.weights_digest
    assert q.param_bytes < f.param_bytes
