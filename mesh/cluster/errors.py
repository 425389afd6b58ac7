"""Typed errors of the cluster layer. Each one says what to do about it."""

from __future__ import annotations

from mesh.errors import MeshError


class ClusterError(MeshError):
    """Base of the cluster layer's errors."""


class CorruptClusterState(ClusterError):
    """The persisted election state could not be read."""
