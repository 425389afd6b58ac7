"""Record ciphers (AEAD, 32-byte key, 12-byte nonce, 16-byte tag) and which ones this machine runs.

    aes256gcm          OpenSSL through `cryptography`; several GB/s with AES instructions
    chacha20poly1305   libsodium through PyNaCl's cffi bindings; ~400 MB/s per core, no
                       hardware needed, so every node supports it (the fallback)

Both seal into and open into caller-owned buffers (opening in place when `out` is the
start of `cipher`), so no record is copied on its way through. The handshake picks one
per connection (`choose`); the nonces and keys a channel feeds them are its business.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl import bindings as _nacl_init  # noqa: F401  # runs sodium_init: picks the SIMD code, detects AES
from nacl._sodium import ffi, lib

AES_GCM = "aes256gcm"
CHACHA = "chacha20poly1305"
KNOWN = (AES_GCM, CHACHA)
TAG = 16


class ChaCha20Poly1305:
    name = CHACHA

    def __init__(self, key: bytes) -> None:
        self._key = key

    def seal_into(self, out: Any, plain: Any, aad: bytes, nonce: bytes) -> None:
        """Encrypt `plain` into `out` (exactly len(plain) + TAG bytes)."""
        n = memoryview(plain).nbytes
        lib.crypto_aead_chacha20poly1305_ietf_encrypt(
            ffi.from_buffer(out), ffi.NULL, ffi.from_buffer(plain), n, aad, len(aad), ffi.NULL, nonce, self._key
        )

    def open_into(self, out: Any, cipher: Any, aad: bytes, nonce: bytes) -> bool:
        """Decrypt `cipher` into `out` (len(cipher) - TAG bytes); False when authentication fails."""
        rc = lib.crypto_aead_chacha20poly1305_ietf_decrypt(
            ffi.from_buffer(out, require_writable=True), ffi.NULL, ffi.NULL, ffi.from_buffer(cipher),
            memoryview(cipher).nbytes, aad, len(aad), nonce, self._key,
        )
        return rc == 0


class Aes256Gcm:
    name = AES_GCM

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal_into(self, out: Any, plain: Any, aad: bytes, nonce: bytes) -> None:
        self._aead.encrypt_into(nonce, plain, aad, out)

    def open_into(self, out: Any, cipher: Any, aad: bytes, nonce: bytes) -> bool:
        try:
            self._aead.decrypt_into(nonce, cipher, aad, out)
        except InvalidTag:
            return False
        return True


def make(name: str, key: bytes) -> ChaCha20Poly1305 | Aes256Gcm:
    if name == AES_GCM:
        return Aes256Gcm(key)
    if name == CHACHA:
        return ChaCha20Poly1305(key)
    raise ValueError(f"unknown record cipher {name!r}; known: {', '.join(KNOWN)}")


@lru_cache(maxsize=1)
def supported() -> tuple[str, ...]:
    """The ciphers this node offers, most preferred first: AES-256-GCM only with AES hardware."""
    return (AES_GCM, CHACHA) if _has_aes_hardware() else (CHACHA,)


def _has_aes_hardware() -> bool:
    if lib.crypto_aead_aes256gcm_is_available():  # x86: AES-NI and PCLMULQDQ
        return True
    machine = platform.machine().lower()
    if machine not in ("arm64", "aarch64"):
        return False
    if platform.system() == "Darwin":
        return True  # every Apple Silicon core has the ARMv8 crypto extensions
    try:
        with open("/proc/cpuinfo") as f:
            features = {w for line in f if line.startswith("Features") for w in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return {"aes", "pmull"} <= features


def choose(ours: tuple[str, ...], offered: list[str]) -> str | None:
    """The responder's pick: its most preferred cipher that the initiator offered."""
    for name in ours:
        if name in offered:
            return name
    return None


def check_names(names: Any) -> tuple[str, ...]:
    """Validate a local cipher preference list (e.g. `ActorSystem(ciphers=...)`)."""
    names = tuple(names)
    if not names or any(n not in KNOWN for n in names):
        raise ValueError(f"ciphers must be a non-empty list drawn from {', '.join(KNOWN)}; got {names!r}")
    return names

