"""Fixtures for the tokenizer tests: each cached test model, as (name, path)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizer_models import CHAT_MODELS, MODELS, cached_gguf


def _cached(request) -> tuple[str, Path]:
    if request.param == "smollm2-135m":
        return request.param, request.getfixturevalue("model_path")
    return request.param, cached_gguf(request.param)


@pytest.fixture(scope="session", params=MODELS)
def gguf_model(request) -> tuple[str, Path]:
    """(name, path) of each tokenizer test model that is cached."""
    return _cached(request)


@pytest.fixture(scope="session", params=CHAT_MODELS)
def chat_model(request) -> tuple[str, Path]:
    """(name, path) of each cached tokenizer test model that has a chat template."""
    return _cached(request)
