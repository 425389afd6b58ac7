"""A real 3-node mesh (three `mesh join` processes on loopback) shared by the API tests.

Node 2 requires an API key; nodes 0 and 1 do not. All three state the same speed score
(`--speed 1`), so the plan is 10/10/10 whatever the machine is doing at start.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.testing.launcher import LocalCluster

from api_settings import API_KEY, ARTIFACTS, MAX_TOKENS, PROMPT


@pytest.fixture(scope="session")
def mesh3(model_path):
    cluster = LocalCluster(n=3, extra_args=["--speed", "1"], api_keys={2: API_KEY})
    with cluster:
        view = asyncio.run(cluster.wait_ready(timeout=240, stages=3))
        cluster.view = view
        yield cluster


@pytest.fixture(scope="session")
def reference(model_path) -> dict:
    """What `python -m mesh generate --json` (one process, whole model) answers."""
    out = subprocess.run([sys.executable, "-m", "mesh", "generate", "--json", "--prompt", PROMPT,
                          "--max-tokens", str(MAX_TOKENS)], capture_output=True, text=True, timeout=180,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
