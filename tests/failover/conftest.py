"""Fixtures of the failover tests: the single-device reference of tests/pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "pipeline"))

from meshtest import Reference  # noqa: E402


@pytest.fixture(scope="session")
def reference(model_path: Path) -> Reference:
    return Reference(model_path)
