"""`mesh admit KEY`: approve a device that asks to join a cluster run with `--admit ask`.

KEY is the new device's node id, or the first characters of it as `mesh status` lists it
among the keys waiting to join. The node asked (found like `mesh status` finds one)
tells the coordinator over the authenticated link, and the coordinator admits the key.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp

from mesh.commands.run import add_api_arguments, api_key, find_api
from mesh.errors import MeshError


class AdmitFailed(MeshError):
    pass


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("admit", help="approve a device waiting to join (--admit ask)",
                       description="Approve a key that asked to join; `mesh status` lists the waiting keys.")
    p.add_argument("key", metavar="KEY", help="the node id, or its first characters, of a key waiting to join")
    add_api_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    api = asyncio.run(find_api(args))
    node_id = asyncio.run(post_admit(api, args.key, api_key(args)))
    print(f"admitted {node_id}")
    return 0


async def post_admit(api: str, key: str, api_key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.post(api.rstrip("/") + "/v1/cluster/admit", json={"key": key}, headers=headers) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
                    raise AdmitFailed(f"{api} did not admit {key!r}: {message or resp.status}")
                return str(body["admitted"])
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
        raise AdmitFailed(f"cannot reach {api}: {exc or type(exc).__name__}; is a node running there?") from None
