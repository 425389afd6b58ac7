"""`mesh run PROMPT`: ask the cluster one question and stream the answer.

The cluster is found by mDNS (`_mesh-api._tcp` on --interface) unless --api names a node.
Anyone on the LAN can announce an API, so a found one is used only when its record is
signed by a node we trust: one named with --trust, the node of this machine's state dir,
or a member of the cluster one of those reports. Nothing (no prompt, no key) is sent to
any other announcer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from pathlib import Path

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
    p.add_argument("--api-key-file", type=Path, metavar="PATH", help="read the bearer token from PATH (mode 0600)")
    p.add_argument("--trust", action="append", default=[], metavar="NODE_ID",
                   help="with mDNS: a node id (or its first 8+ hex digits) whose signed announcement to trust, "
                        "as `mesh status` shows them on a member (repeatable). The node of --state-dir is "
                        "trusted too, and so are the members a trusted node reports")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="this machine's node state dir, whose node is trusted (default $MESH_HOME/node)")
    p.add_argument("--node", metavar="ID_OR_NAME",
                   help="with mDNS: use the node with this name or id prefix (when several meshes share the LAN)")
    p.add_argument("--discover-timeout", type=float, default=3.0,
                   help="seconds to search by mDNS before giving up (default 3)")


def api_key(args: argparse.Namespace) -> str | None:
    if getattr(args, "api_key_file", None) is not None:
        from mesh.secret_files import read_secret_file

        return read_secret_file(args.api_key_file, flag="--api-key-file").decode("utf-8", "replace")
    return args.api_key


def local_node_id(state_dir: Path | None) -> str | None:
    """The id of the node whose state dir this is, if it exists and we may read its key."""
    from actors.identity import node_id_of
    from actors.statefiles import StateFileError, read_private
    from mesh import models
    from nacl.signing import SigningKey

    path = (state_dir or models.mesh_home() / "node") / "node.key"
    try:
        seed = read_private(path, max_bytes=64)
    except StateFileError:
        return None
    return node_id_of(bytes(SigningKey(seed).verify_key)) if seed is not None and len(seed) == 32 else None


def _matches(node_id: str, pins: set[str]) -> bool:
    return any(node_id == p or (len(p) >= 8 and node_id.startswith(p)) for p in pins)


async def _members(hint, key: str | None) -> set[str]:
    """The member ids a trusted node reports (its /v1/cluster), or none if it does not answer."""
    import aiohttp

    headers = {"Authorization": f"Bearer {key}"} if key and hint.needs_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with http.get(hint.url + "/v1/cluster", headers=headers) as resp:
                view = await resp.json() if resp.status == 200 else {}
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return set()
    nodes = view.get("nodes") if isinstance(view, dict) else None
    # Only admitted members: a key that merely heartbeats to the node is listed, not trusted.
    return {n["id"] for n in nodes if isinstance(n, dict) and isinstance(n.get("id"), str)
            and n.get("member", True) is not False} if isinstance(
        nodes, list) else set()


async def trusted_hints(hints: list, pins: set[str], key: str | None) -> list:
    """The verified hints of trusted nodes: pinned ids, then the members those report."""
    verified = [h for h in hints if h.verified]
    anchors = [h for h in verified if _matches(h.node_id, pins)]
    members = set(pins)
    for hint in anchors:
        members |= await _members(hint, key)
    return [h for h in verified if _matches(h.node_id, members)]


async def find_api(args: argparse.Namespace) -> str:
    """The API URL to use: --api, or the first trusted node found by mDNS on the given interfaces."""
    if args.api:
        return args.api if "://" in args.api else "http://" + args.api
    from mesh.http.discovery import find_apis

    interfaces = args.interfaces or ["127.0.0.1"]
    hints = await find_apis(interfaces, timeout=args.discover_timeout)
    if not hints:
        raise NoApiFound(f"no mesh API answered mDNS on {', '.join(interfaces)} within {args.discover_timeout:g}s; "
                         "start nodes with `mesh join`, pass --interface <lan ip>, or name one with --api URL")
    pins = {p.lower() for p in args.trust}
    own = local_node_id(args.state_dir)
    if own is not None:
        pins.add(own)
    key = api_key(args)
    trusted = await trusted_hints(hints, pins, key)
    if not trusted:
        # The first answers are not always the trusted node's (a busy node, or a stranger that
        # answers fast): browse the whole window before giving up.
        hints = await find_apis(interfaces, timeout=args.discover_timeout, settle=None) or hints
        trusted = await trusted_hints(hints, pins, key)
    if not trusted:
        seen = ", ".join(f"{h.name or '?'} {h.node_id[:16] or '?'} at {h.url} "
                         f"({'signed, not a known member' if h.verified else 'not validly signed'})" for h in hints)
        raise NoApiFound(f"found mesh API announcements on {', '.join(interfaces)}, but none from a node this "
                         f"machine trusts: {seen}. Nothing was sent to them. Pass --trust NODE_ID (a member's id, "
                         "as `mesh status` shows it on that machine) or name a node with --api URL")
    if args.node:
        trusted = [h for h in trusted if h.name == args.node or h.node_id.startswith(args.node)]
        if not trusted:
            raise NoApiFound(f"no trusted node named or with id {args.node!r} answered mDNS on "
                             f"{', '.join(interfaces)}")
    usable = [h for h in trusted if key or not h.needs_key]
    if not usable:
        raise NoApiFound(f"the mesh APIs found ({', '.join(h.url for h in trusted)}) require a key; pass --api-key")
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
                               top_p=args.top_p, seed=args.seed, raw=args.raw, api_key=api_key(args), on_text=show)
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
