"""`python -m mesh`: a thin command line over the library."""

from __future__ import annotations

import argparse
import json
import sys

from mesh import models
from mesh.errors import MeshError


def _cmd_models(args: argparse.Namespace) -> int:
    if args.models_cmd == "list":
        rows = models.list_models()
        if args.json:
            print(json.dumps(rows))
        else:
            for row in rows:
                state = "cached" if row["cached"] else "not cached"
                print(f"{row['name']:<16} {state:<11} {row['description']}")
        return 0
    if args.models_cmd == "pull":
        path = models.pull(args.name)
        print(path)
        return 0
    raise AssertionError(args.models_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_models = sub.add_parser("models", help="list and fetch models in the local cache")
    msub = p_models.add_subparsers(dest="models_cmd", required=True)
    p_list = msub.add_parser("list", help="the known models and whether they are cached")
    p_list.add_argument("--json", action="store_true", help="print one JSON list")
    p_pull = msub.add_parser("pull", help="fetch a registry model into the cache ($MESH_HOME or ~/.cache/mesh)")
    p_pull.add_argument("name", help="registry name, e.g. smollm2-135m")
    p_models.set_defaults(func=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except MeshError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
