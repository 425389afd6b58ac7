"""Fixtures for kernels tests: the real model, loaded once per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
    "List three fruits that are red.",
    "How many legs does a spider have?",
]


@pytest.fixture(scope="session")
def hf_reference(model_path: Path, hf_tokenizer):
    """transformers' own GGUF loader: (model, tokenizer), float32, the reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_path.parent, gguf_file=model_path.name, dtype=torch.float32)
    model.eval()
    return model, hf_tokenizer


@pytest.fixture(scope="session")
def hf_tokenizer(model_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)


@pytest.fixture(scope="session")
def chat_ids(hf_tokenizer) -> list[np.ndarray]:
    """Token ids of CHAT_PROMPTS through transformers' chat template."""
    tok = hf_tokenizer
    out = []
    for text in CHAT_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True)
        if not isinstance(ids, list):
            ids = ids["input_ids"]
        out.append(np.asarray(ids, dtype=np.int64))
    return out


@pytest.fixture(scope="session")
def full_stage(model_path: Path):
    from kernels.config import load_config
    from kernels.loader import load_stage
    from kernels.stage import StageSpec

    return load_stage(model_path, StageSpec.full(load_config(model_path).n_layers), "torch", "float32")


@pytest.fixture(scope="session")
def quant_stage(model_path: Path):
    from kernels.config import load_config
    from kernels.loader import load_stage
    from kernels.stage import StageSpec

    return load_stage(model_path, StageSpec.full(load_config(model_path).n_layers), "torch", "quant")
