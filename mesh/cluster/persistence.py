"""Durable election state: term, vote, commit index and the (small) configuration log.

The election machine calls `Storage.save` synchronously before any message that
depends on the new state leaves the node: a vote is on disk before it is granted.
`FileStorage` writes atomically (temporary file, fsync, rename, fsync of the folder),
so a crash leaves either the old or the new state, never a torn one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from actors.statefiles import StateFileError, create_private, read_private
from mesh.cluster.errors import CorruptClusterState
from mesh.cluster.messages import Entry, entry_from_list, entry_to_list

STATE_FILE = "election.json"


@dataclass(frozen=True, slots=True)
class HardState:
    term: int = 0
    voted_for: str | None = None
    commit: int = 0
    log: tuple[Entry, ...] = field(default_factory=tuple)


class Storage(Protocol):
    def load(self) -> HardState: ...

    def save(self, state: HardState) -> None: ...


class MemoryStorage:
    """Keeps the state in memory; survives a simulated crash because the simulator keeps the object."""

    def __init__(self, state: HardState | None = None) -> None:
        self.state = state or HardState()
        self.saves = 0

    def load(self) -> HardState:
        return self.state

    def save(self, state: HardState) -> None:
        self.state = state
        self.saves += 1


def encode_state(state: HardState) -> bytes:
    doc = {
        "version": 1,
        "term": state.term,
        "voted_for": state.voted_for,
        "commit": state.commit,
        "log": [entry_to_list(e) for e in state.log],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_state(data: bytes) -> HardState:
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise ValueError("unknown state version")
    log = [entry_from_list(item) for item in doc["log"]]  # entries saved before members: members = voters
    term, voted_for, commit = doc["term"], doc["voted_for"], doc["commit"]
    if not isinstance(term, int) or not isinstance(commit, int) or commit > len(log):
        raise ValueError("bad term or commit index")
    if voted_for is not None and not isinstance(voted_for, str):
        raise ValueError("bad vote")
    return HardState(term, voted_for, commit, tuple(log))


class FileStorage:
    """`<state_dir>/election.json`, replaced atomically with fsync on every save; read with
    O_NOFOLLOW, and its temporary file created with O_EXCL (a planted link is never followed)."""

    def __init__(self, state_dir: Path | str) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE

    def load(self) -> HardState:
        try:
            data = read_private(self.path, secret=False)  # votes are not secret, but never read via a link
        except StateFileError as exc:
            raise CorruptClusterState(str(exc)) from None
        if data is None:
            return HardState()
        try:
            return decode_state(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptClusterState(
                f"{self.path} is unreadable ({exc}); move it away to rejoin the cluster as a new member"
            ) from exc

    def save(self, state: HardState) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        try:
            os.unlink(tmp)  # left by a crash between write and rename (a link is removed, not followed)
        except FileNotFoundError:
            pass
        if not create_private(tmp, encode_state(state), fsync=True):
            raise CorruptClusterState(f"{tmp} appeared while saving the election state; is another node "
                                      "using this state dir?")
        os.replace(tmp, self.path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
