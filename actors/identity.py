"""A node's identity: an Ed25519 key kept in its state dir; node id = short BLAKE3 of the public key."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import blake3
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .log import get_logger

KEY_FILE = "node.key"
NODE_ID_HEX = 16
log = get_logger("actors.identity")


def node_id_of(public_key: bytes) -> str:
    """16 hex chars of BLAKE3(public key)."""
    return blake3.blake3(public_key).hexdigest()[:NODE_ID_HEX]


class NodeIdentity:
    """An Ed25519 signing key and the node id derived from it."""

    def __init__(self, signing_key: SigningKey) -> None:
        self._key = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.node_id: str = node_id_of(self.public_key)

    @classmethod
    def generate(cls) -> "NodeIdentity":
        """A fresh identity held only in memory (tests, throw-away nodes)."""
        return cls(SigningKey.generate())

    @classmethod
    def load_or_create(cls, state_dir: str | os.PathLike[str]) -> "NodeIdentity":
        """Load `<state_dir>/node.key`, creating it (mode 0600) on first start."""
        directory = Path(state_dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / KEY_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                log.warning("identity.key_mode_fixed", path=str(path), mode=oct(mode))
                path.chmod(0o600)
            seed = path.read_bytes()
            if len(seed) != 32:
                raise ValueError(f"{path} is not a 32-byte Ed25519 seed; move it away to create a new identity")
            return cls(SigningKey(seed))
        key = SigningKey.generate()
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(key))
        log.info("identity.created", path=str(path), node_id=node_id_of(bytes(key.verify_key)))
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        """A detached 64-byte Ed25519 signature."""
        return self._key.sign(data).signature

    @staticmethod
    def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
        try:
            VerifyKey(public_key).verify(data, signature)
            return True
        except (BadSignatureError, ValueError, TypeError):
            return False

    def __repr__(self) -> str:
        return f"NodeIdentity({self.node_id})"
