"""Fixtures of the pipeline tests: one 3-node mesh of real `mesh join` processes shared
by every module that needs it (see meshtest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from meshtest import running_cluster

from mesh.testing.launcher import LocalCluster


@pytest.fixture(scope="session")
def cluster3() -> Iterator[LocalCluster]:
    """One 3-node torch mesh shared by every pipeline test that needs the default shape."""
    with running_cluster(3) as cluster:
        yield cluster
