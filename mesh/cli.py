"""`python -m mesh`: a thin command line over the library."""

from __future__ import annotations

import argparse
import importlib
import sys

from actors.statefiles import StateFileError
from mesh.commands import COMMAND_MODULES
from mesh.errors import MeshError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh",
        description="A verifiable, self-healing, peer-to-peer inference mesh for the devices in one home.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (MeshError, StateFileError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
