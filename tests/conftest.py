"""Fixtures shared by every test folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py: the single-device reference


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The default model (SmolLM2-135M-Instruct Q4_1 GGUF), fetched into the cache once."""
    from mesh import models

    return models.resolve(models.DEFAULT_MODEL, fetch=True)


@pytest.fixture(scope="session")
def reference(model_path: Path):
    """Single-device generation in this process, memoized (tests/reference.py)."""
    from reference import Reference

    return Reference(model_path)
