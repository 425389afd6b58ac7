from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def stages(model_path):
    """Loaded kernels stages shared by every verify test (by spec, backend, mode, fault)."""
    from mesh.testing.verify_harness import StageCache

    return StageCache(model_path)


@pytest.fixture(scope="session")
def prompt(model_path) -> list[int]:
    from kernels.tokenizer import Tokenizer

    tok = Tokenizer.from_model(model_path)
    text = tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}],
                                   add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)
