"""A process that announces itself by mDNS and prints the peers it finds (one JSON per line).

Run by test_discovery.py inside private network namespaces, never on real interfaces.
`--garbage` also registers hostile records that every other probe must ignore.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from mesh.cluster.discovery import SERVICE_TYPE, MdnsDiscovery, PeerHint, cluster_tag


async def hostile_records(bind: str, secret: bytes) -> AsyncZeroconf:
    zc = AsyncZeroconf(interfaces=[bind], ip_version=IPVersion.V4Only)
    tag = cluster_tag(secret)
    bad = [
        {"id": "x" * 200, "port": "1", "cluster": tag},
        {"id": "ok1", "port": "99999", "cluster": tag},
        {"id": "ok2", "port": "abc", "cluster": tag},
        {b"id": b"\xff\xfe", b"port": b"7000", b"cluster": tag.encode()},
        {"id": "bad id!", "port": "7000", "cluster": tag},
        {"id": "other", "port": "7000", "cluster": "0000000000000000"},
        {"id": "notag", "port": "7000"},
    ]
    for i, props in enumerate(bad):
        info = AsyncServiceInfo(
            SERVICE_TYPE, f"junk{i}.{SERVICE_TYPE}", addresses=[socket.inet_aton(bind)], port=7000,
            properties=props, server=f"junk{i}.local.",
        )
        await zc.async_register_service(info)
    return zc


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bind", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--secret", default="home")
    p.add_argument("--want", type=int, required=True)
    p.add_argument("--timeout", type=float, default=15)
    p.add_argument("--linger", type=float, default=3)
    p.add_argument("--garbage", action="store_true")
    a = p.parse_args()
    found: dict[str, PeerHint] = {}
    done = asyncio.Event()

    def on_peer(hint: PeerHint) -> None:
        if hint.node_id not in found:
            found[hint.node_id] = hint
            print(json.dumps({"id": hint.node_id, "host": hint.host, "port": hint.port}), flush=True)
        if len(found) >= a.want:
            done.set()

    junk = await hostile_records(a.bind, a.secret.encode()) if a.garbage else None
    disc = MdnsDiscovery(a.id, a.port, a.secret.encode(), [a.bind], on_peer)
    await disc.start()
    try:
        await asyncio.wait_for(done.wait(), a.timeout)
        await asyncio.sleep(a.linger)  # let the others find us too, and catch late junk
    except TimeoutError:
        print(json.dumps({"timeout": sorted(found)}), flush=True)
        sys.exit(1)
    finally:
        await disc.stop()
        if junk is not None:
            await junk.async_close()


if __name__ == "__main__":
    asyncio.run(main())
