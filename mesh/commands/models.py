"""`mesh models list|pull`: the local model cache."""

from __future__ import annotations

import argparse
import json
import sys

from mesh import models


def register(sub: argparse._SubParsersAction) -> None:
    p_models = sub.add_parser("models", help="list and fetch models in the local cache")
    msub = p_models.add_subparsers(dest="models_cmd", required=True)
    p_list = msub.add_parser("list", help="the known models and whether they are cached")
    p_list.add_argument("--json", action="store_true", help="print one JSON list")
    p_pull = msub.add_parser("pull", help="fetch a registry model into the cache ($MESH_HOME or ~/.cache/mesh)")
    p_pull.add_argument("name", help="registry name, e.g. smollm2-135m")
    p_models.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.models_cmd == "list":
        rows = models.list_models()
        if args.json:
            print(json.dumps(rows))
        else:
            for row in rows:
                state = "cached" if row["cached"] else "not cached"
                print(f"{row['name']:<16} {state:<11} {row['description']}")
        return 0
    path = models.pull(args.name, progress=sys.stderr.isatty())
    print(path)
    return 0
