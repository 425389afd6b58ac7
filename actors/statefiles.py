"""Private files in a node's state dir: opened with O_NOFOLLOW, created with O_EXCL, 0600.

Another local user who can write to the state dir (or to a shared temporary folder a
test uses) must not be able to make the node read a key of their choosing through a
symlink, or write its key or votes through one to a file of theirs.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import ActorsError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class StateFileError(ActorsError):
    """A state-dir file that is a symlink, not a regular file, or readable by others."""


def state_dir(path: str | os.PathLike[str]) -> Path:
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def read_private(path: str | os.PathLike[str], *, max_bytes: int = 1 << 20, secret: bool = True) -> bytes | None:
    """The file's bytes, or None if it does not exist. Refuses a symlink, a non-regular
    file and, when it holds a ``secret``, one group or others can read (as ssh refuses such a key)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            raise StateFileError(f"{path} is a symlink; a state file must be a plain file. Remove the link") from None
        raise StateFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateFileError(f"{path} is not a regular file; move it away")
        mode = stat.S_IMODE(info.st_mode)
        if secret and mode & 0o077:
            raise StateFileError(f"{path} is readable by group or others (mode {mode:04o}); "
                                 f"restrict it with `chmod 600 {path}`")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise StateFileError(f"{path} is larger than {max_bytes} bytes; move it away")
        return b"".join(chunks)
    finally:
        os.close(fd)


def create_private(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> bool:
    """Write a new 0600 file; False if one exists already (never replaced, never followed)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
    except FileExistsError:
        return False
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return True
