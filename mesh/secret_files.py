"""Reading a secret from a file, as ssh reads a private key: refused when group or others
can read it, or when it is too guessable to be a secret. Used for the cluster secret
(`--secret-file`) and the API key (`--api-key-file`).

The entropy estimate is deliberately rough and conservative: the smaller of the text's
Shannon entropy (per character, times its length) and its zlib-compressed size in bits.
A `mesh secret new` file (64 random hex digits) estimates at about 240 bits; a password
such as ``correct-horse-battery`` or a repeated pattern falls below the 100 bits asked; a
long English sentence does not (the estimate cannot tell prose from noise).
"""

from __future__ import annotations

import math
import os
import secrets
import stat
import zlib
from collections import Counter
from pathlib import Path

from mesh.errors import MeshError

MIN_BITS = 100  # a 32-hex-digit (128-bit) key estimates at about 113
MAX_BYTES = 4096


class SecretFileError(MeshError):
    pass


def estimated_bits(secret: bytes) -> float:
    if not secret:
        return 0.0
    counts = Counter(secret)
    per_symbol = -sum(c / len(secret) * math.log2(c / len(secret)) for c in counts.values())
    compressed = max(0, len(zlib.compress(secret, 9)) - 8) * 8  # zlib's header and checksum carry nothing
    return min(per_symbol * len(secret), compressed)


def read_secret_file(path: Path | str, *, flag: str, min_bits: float = MIN_BITS,
                     fix: str = "python -m mesh secret new PATH") -> bytes:
    """The stripped contents of ``path``; ``flag`` names the option in the errors."""
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise SecretFileError(f"cannot read {flag} {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)  # of the file opened, not of whatever the path names a moment later
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{flag} {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise SecretFileError(
                f"{flag} {path} is readable by group or others (mode {mode:04o}); anyone who can read it can "
                f"join the cluster or use the API. Restrict it with `chmod 600 {path}`")
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise SecretFileError(f"{flag} {path} is larger than {MAX_BYTES} bytes; is it the right file?")
    secret = data.strip()
    bits = estimated_bits(secret)
    if bits < min_bits:
        raise SecretFileError(
            f"{flag} {path} is too guessable to be a secret (about {bits:.0f} bits of entropy; at least "
            f"{min_bits:.0f} are needed). Create a random one with `{fix}`")
    return secret


LOOPBACK_SECRET_FILE = "loopback.secret"


def loopback_secret(state_dir: Path) -> tuple[bytes, Path, bool]:
    """The secret of a loopback-only node started without --secret-file: random, made once
    per state dir (O_EXCL, 0600), never a fixed value that anyone could look up. Returns
    (secret, its file, whether it was just created). Other nodes on this machine join
    with ``--secret-file`` pointing at that file."""
    from actors.statefiles import create_private, read_private, state_dir as make_state_dir

    path = make_state_dir(state_dir) / LOOPBACK_SECRET_FILE
    data = read_private(path, max_bytes=MAX_BYTES)
    created = False
    if data is None:
        created = create_private(path, (secrets.token_hex(32) + "\n").encode(), fsync=True)
        data = read_private(path, max_bytes=MAX_BYTES) or b""
    secret = data.strip()
    if estimated_bits(secret) < MIN_BITS:
        raise SecretFileError(f"{path} is too guessable to be a secret; delete it and a new one is made")
    return secret, path, created
