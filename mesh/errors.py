"""Typed errors of the mesh package. Each one says what to do about it."""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error the mesh reports to a user as one line."""


class UnknownModel(MeshError):
    pass


class ModelFetchFailed(MeshError):
    pass


class ModelChecksumMismatch(MeshError):
    pass


class BadRequest(MeshError):
    pass


class Unavailable(MeshError):
    """The cluster cannot serve right now (no pipeline, cut off, too little memory); the
    message says why."""
