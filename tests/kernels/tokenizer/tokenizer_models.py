"""The real models whose GGUF tokenizers are checked, and transformers' tokenizer of each.

smollm2-135m (byte-level BPE, "smollm" split) is the default model and always there.
qwen2.5-coder-0.5b (byte-level BPE, "qwen2" split, a template with a default system prompt)
and gemma-3-270m (SentencePiece, no chat template: a base model) are tested when cached;
loading transformers' tokenizer for them takes 10-15 s, so their cases are marked slow.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import pytest

MODELS = [
    pytest.param("smollm2-135m", id="smollm2"),
    pytest.param("qwen2.5-coder-0.5b", id="qwen2.5", marks=pytest.mark.slow),
    pytest.param("gemma-3-270m", id="gemma3", marks=pytest.mark.slow),
]


def cached_gguf(name: str) -> Path:
    """The model's GGUF in the mesh cache, or skip the test saying how to get it."""
    from mesh import models

    if name in models.REGISTRY:
        if models.is_cached(name):
            return models.resolve(name)
    else:  # a model the registry does not list yet: any single .gguf in its cache folder
        found = sorted((models.cache_dir() / name).glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    pytest.skip(f"{name} is not in the model cache ({models.cache_dir() / name}); "
                f"run `python -m mesh models pull {name}` to test it")


@lru_cache(maxsize=None)
def ours(path: Path):
    from kernels.tokenizer import Tokenizer

    return Tokenizer.from_model(path)


@lru_cache(maxsize=None)
def reference(path: Path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
