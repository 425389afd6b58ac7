"""The failover tests use the pipeline tests' real-process helpers (tests/pipeline/meshtest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "pipeline"))
