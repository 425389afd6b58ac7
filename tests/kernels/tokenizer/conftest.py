"""Fixtures for the tokenizer tests: each cached test model, as (name, path)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizer_models import MODELS, cached_gguf


@pytest.fixture(scope="session", params=MODELS)
def gguf_model(request) -> tuple[str, Path]:
    """(name, path) of each tokenizer test model that is cached."""
    if request.param == "smollm2-135m":
        return request.param, request.getfixturevalue("model_path")
    return request.param, cached_gguf(request.param)
