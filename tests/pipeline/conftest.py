"""Fixtures of the pipeline tests: the in-process single-device reference and one
3-node mesh shared by every module that needs it (see meshtest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from meshtest import Reference, running_cluster

from mesh.testing.launcher import LocalCluster


@pytest.fixture(scope="session")
def reference(model_path: Path) -> Reference:
    return Reference(model_path)


@pytest.fixture(scope="session")
def cluster3() -> Iterator[LocalCluster]:
    """One 3-node torch mesh shared by every pipeline test that needs the default shape."""
    with running_cluster(3) as cluster:
        yield cluster
