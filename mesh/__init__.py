"""mesh: a verifiable, self-healing, peer-to-peer inference mesh for the devices in one home.

The public library API (imported lazily, so `python -m mesh --help` stays fast):

- `Node`, `NodeConfig` — one node; ``async with Node(NodeConfig(...)) as node``,
  ``await node.wait_ready()``, ``async for event in node.generate("...")``, ``node.chat(...)``.
- `local_cluster(n)` — N nodes in this process on loopback (`LocalMesh`), for apps and tests.
- `GenerationParams`, `TokenEvent` — what a request asks for and what it streams back.
- `MeshError` — the base of every error mesh reports.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Node": "mesh.node",
    "NodeConfig": "mesh.node",
    "local_cluster": "mesh.testing.local",
    "LocalMesh": "mesh.testing.local",
    "GenerationParams": "mesh.generation",
    "TokenEvent": "mesh.generation",
    "MeshError": "mesh.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mesh' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
