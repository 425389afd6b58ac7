"""The torch backend against transformers on the real model (float32 and quant)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.stage import StepInput

torch = pytest.importorskip("torch")

GREEDY_TOKENS = 32
QUANT_TOKENS = 16
# float32 vs transformers, last-position logits (measured ~4e-5 max abs on logits of magnitude ~25)
F32_MAX_ABS = 1e-3
F32_MAX_REL = 1e-4  # max abs diff / max |reference logit|
# quant (int4 group-32 layers, int8 head, bfloat16 activations) vs float32: measured ~0.8 max abs
QUANT_MAX_REL = 0.08


def _greedy(stage, ids: np.ndarray, n: int, session: str) -> list[int]:
    out = []
    logits = stage.forward([StepInput(session, 0, tokens=ids)])[0]
    for i in range(n):
        tok = int(np.argmax(logits[-1]))
        out.append(tok)
        if tok in stage.config.eos_token_ids:
            break
        logits = stage.forward([StepInput(session, len(ids) + i, tokens=np.array([tok]))])[0]
    stage.free(session)
    return out


@pytest.fixture(scope="module")
def hf_greedy(hf_reference, chat_ids) -> list[list[int]]:
    model, _ = hf_reference
    eos = model.config.eos_token_id
    outs = []
    with torch.inference_mode():
        for ids in chat_ids:
            gen = model.generate(torch.tensor(ids)[None], max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)
            toks = gen[0, len(ids):].tolist()
            if eos in toks:
                toks = toks[:toks.index(eos) + 1]
            outs.append(toks)
    return outs


def _hf_last_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor(ids)[None]).logits[0, -1].float().numpy()


@pytest.mark.slow
def test_float32_logits_match_transformers(full_stage, hf_reference, chat_ids):
    model, _ = hf_reference
    for i, ids in enumerate(chat_ids):
        ref = _hf_last_logits(model, ids)
        ours = full_stage.forward([StepInput(f"l{i}", 0, tokens=ids)])[0]
        full_stage.free(f"l{i}")
        assert ours.shape == (1, model.config.vocab_size) and ours.dtype == np.float32
        diff = np.abs(ours[0] - ref).max()
        assert diff <= F32_MAX_ABS, diff
        assert diff / np.abs(ref).max() <= F32_MAX_REL


@pytest.mark.slow
def test_float32_greedy_matches_transformers(full_stage, hf_greedy, chat_ids):
    for i, ids in enumerate(chat_ids):
        ours = _greedy(full_stage, ids, GREEDY_TOKENS, f"g{i}")
        assert ours == hf_greedy[i], f"prompt {i}"


@pytest.mark.slow
def test_quant_greedy_matches_first_16(quant_stage, hf_greedy, chat_ids, full_stage):
    for i, ids in enumerate(chat_ids):
        ours = _greedy(quant_stage, ids, QUANT_TOKENS, f"q{i}")
        assert ours == hf_greedy[i][:QUANT_TOKENS], f"prompt {i}"
        ref = full_stage.forward([StepInput(f"f{i}", 0, tokens=ids)])[0]
        got = quant_stage.forward([StepInput(f"q{i}", 0, tokens=ids)])[0]
        full_stage.free(f"f{i}")
        quant_stage.free(f"q{i}")
        assert np.abs(got - ref).max() / np.abs(ref).max() <= QUANT_MAX_REL


@pytest.mark.slow
def test_all_logits_match_transformers(full_stage, hf_reference, chat_ids):
    model, _ = hf_reference
    ids = chat_ids[0]
    with torch.inference_mode():
        ref = model(torch.tensor(ids)[None]).logits[0].numpy()
    ours = full_stage.forward([StepInput("all", 0, tokens=ids)], all_logits=True)[0]
    full_stage.free("all")
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= F32_MAX_ABS
