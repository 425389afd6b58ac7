"""`mesh run PROMPT`: ask the cluster one question and stream the answer.

The cluster is found by mDNS (`_mesh-api._tcp` on --interface) unless --api names a node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from mesh.commands import add_sampling_arguments
from mesh.errors import MeshError


class NoApiFound(MeshError):
    pass


def add_api_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", metavar="URL",
                   help="a node's API, e.g. http://192.168.1.20:8080 (default: find one by mDNS on --interface)")
    p.add_argument("--interface", action="append", default=[], dest="interfaces", metavar="ADDR",
                   help="address of the interface to search by mDNS (repeatable; default 127.0.0.1)")
    p.add_argument("--api-key", default=os.environ.get("MESH_API_KEY"),
                   help="bearer token for a node started with --api-key (default $MESH_API_KEY)")
    p.add_argument("--node", metavar="ID_OR_NAME",
                   help="with mDNS: use the node with this name or id prefix (when several meshes share the LAN)")
    p.add_argument("--discover-timeout", type=float, default=3.0,
                   help="seconds to search by mDNS before giving up (default 3)")


async def find_api(args: argparse.Namespace) -> str:
    """The API URL to use: --api, or the first node found by mDNS on the given interfaces."""
    if args.api:
        return args.api if "://" in args.api else "http://" + args.api
    from mesh.http.discovery import find_apis

    interfaces = args.interfaces or ["127.0.0.1"]
    hints = await find_apis(interfaces, timeout=args.discover_timeout)
    if not hints:
        raise NoApiFound(f"no mesh API answered mDNS on {', '.join(interfaces)} within {args.discover_timeout:g}s; "
                         "start nodes with `mesh join`, pass --interface <lan ip>, or name one with --api URL")
    if args.node:
        hints = [h for h in hints if h.name == args.node or h.node_id.startswith(args.node)]
        if not hints:
            raise NoApiFound(f"no node named or with id {args.node!r} answered mDNS on {', '.join(interfaces)}")
    usable = [h for h in hints if args.api_key or not h.needs_key]
    if not usable:
        raise NoApiFound(f"the mesh APIs found ({', '.join(h.url for h in hints)}) require a key; pass --api-key")
    return usable[0].url


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="ask the cluster one question and stream the answer",
                       description="Send PROMPT to a node of the cluster (found by mDNS, or --api) through its "
                                   "OpenAI-compatible API and stream the answer to stdout.")
    p.add_argument("prompt", help="the user message (or raw text with --raw)")
    add_api_arguments(p)
    add_sampling_arguments(p, max_tokens=128)
    p.add_argument("--raw", action="store_true", help="send the prompt as is (/v1/completions), no chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    from mesh.http.client import stream_chat

    api = await find_api(args)

    def show(text: str) -> None:
        if not args.json:
            sys.stdout.write(text)
            sys.stdout.flush()

    result = await stream_chat(api, args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                               top_p=args.top_p, seed=args.seed, raw=args.raw, api_key=args.api_key, on_text=show)
    if args.json:
        print(json.dumps({"api": api, "text": result.text, "token_ids": result.token_ids,
                          "prompt_token_ids": result.prompt_token_ids, "finish_reason": result.finish_reason,
                          "ttft_s": result.ttft_s, "decode_tokens_per_s": result.decode_tokens_per_s,
                          "mesh": result.mesh}))
    else:
        sys.stdout.write("\n")
        print(f"[{api}: {len(result.token_ids)} tokens, ttft {result.ttft_s:.2f}s, "
              f"{result.decode_tokens_per_s:.1f} tokens/s, finish={result.finish_reason}]", file=sys.stderr)
    return 0
