"""A node's identity: an Ed25519 key kept in its state dir; node id = short BLAKE3 of the public key."""

from __future__ import annotations

import os

import blake3
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .log import get_logger
from .statefiles import StateFileError, create_private, read_private, state_dir as make_state_dir

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
        """Load `<state_dir>/node.key`, creating it (mode 0600, O_EXCL) on first start. A key
        that is a symlink or that group or others can read is refused (`StateFileError`)."""
        path = make_state_dir(state_dir) / KEY_FILE
        seed = read_private(path, max_bytes=64)
        if seed is None:
            key = SigningKey.generate()
            if create_private(path, bytes(key), fsync=True):
                log.info("identity.created", path=str(path), node_id=node_id_of(bytes(key.verify_key)))
                return cls(key)
            seed = read_private(path, max_bytes=64)  # another process created it first
        if seed is None or len(seed) != 32:
            raise StateFileError(f"{path} is not a 32-byte Ed25519 seed; move it away to create a new identity")
        return cls(SigningKey(seed))

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
