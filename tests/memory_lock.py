"""One memory-heavy test module at a time across the pytest processes of `make test`.

tests/lanes.py runs two pytest processes at once and names a lock file in
MESH_TEST_MEMORY_LOCK. The in-process meshes (tests/inproc, about 8 GB) and the
real-model checks (tests/kernels/test_real_models.py, about 10 GB) hold it while they run,
so the two never add up on one 24 GiB machine. Without the variable (a single pytest
process) it is a no-op.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def exclusive() -> Iterator[None]:
    path = os.environ.get("MESH_TEST_MEMORY_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
