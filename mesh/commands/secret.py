"""`mesh secret new PATH`: write a fresh cluster secret, readable by its owner only."""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from mesh.errors import MeshError


class SecretFileExists(MeshError):
    pass


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("secret", help="create a cluster secret to share between your devices")
    ssub = p.add_subparsers(dest="secret_cmd", required=True)
    p_new = ssub.add_parser("new", help="write a fresh random secret to PATH (mode 0600)")
    p_new.add_argument("path", help="where to write it; copy the file to every device of the cluster")
    p_new.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=run)


def write_secret(path: Path, *, force: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise SecretFileExists(f"{path} exists; pass --force to replace it (every node must then get the new one)") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    os.chmod(path, 0o600)


def run(args: argparse.Namespace) -> int:
    path = Path(args.path).expanduser()
    write_secret(path, force=args.force)
    print(f"wrote a new cluster secret to {path}; copy it to every device and pass --secret-file {path}")
    return 0
