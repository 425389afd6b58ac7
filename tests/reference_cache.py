"""transformers' outputs on a model file, computed once per machine and kept beside the models.

Loading a registry model in transformers (its GGUF dequantization) takes 70-90 s, which
is most of what the real-model checks cost. What transformers answers depends only on the
file, the inputs and the library versions, so those are the key: the file's sha256, the
versions of transformers, torch and gguf, and a caller-chosen description of the inputs.
A changed file, library or prompt set is a different key and is computed afresh.

The cache is a folder of .npz files beside the model cache (``~/.cache/mesh/reference``),
written atomically, read without pickle. ``MESH_TEST_FRESH_REFERENCE=1`` ignores it, so
the live comparison is one variable away.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("transformers", "torch", "gguf")}


_file_digests: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    from mesh.models import sha256_file

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _file_digests:
        _file_digests[key] = sha256_file(path)
    return _file_digests[key]


def reference_dir() -> Path:
    from mesh import models

    return models.cache_dir().parent / "reference"


def cached_reference(model: Path, inputs: dict, compute: Callable[[], dict[str, np.ndarray]]
                     ) -> dict[str, np.ndarray]:
    """``compute()``'s arrays for ``model`` and ``inputs`` (anything JSON can write), from
    the cache when the same file, inputs and library versions were computed before."""
    key = {"file_sha256": _file_sha256(model), "versions": _versions(), "inputs": inputs}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = reference_dir() / f"{model.stem}-{digest}.npz"
    if path.exists() and os.environ.get("MESH_TEST_FRESH_REFERENCE") != "1":
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return arrays
