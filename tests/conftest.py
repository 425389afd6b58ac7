"""Fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default model (SmolLM2-135M-Instruct Q4_1 GGUF), fetched into the cache once."""
    from mesh import models

    return models.resolve(models.DEFAULT_MODEL, fetch=True)
