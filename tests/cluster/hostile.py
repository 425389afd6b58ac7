"""Junk for a running cluster: hostile mDNS TXT records and garbage TCP connections.

    python hostile.py --bind 10.77.0.4 --secret <cluster secret file> --target 10.77.0.1:7946 ... --seconds 20

Registers records with the cluster's own tag but broken fields (and records of other
clusters), and keeps opening connections to every target that send random bytes, an
absurd frame length, or nothing at all. Prints the running totals as JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from mdns_probe import hostile_records  # noqa: E402


async def garbage_connection(host: str, port: int, rng: random.Random) -> str:
    kind = rng.choice(["random", "huge_length", "silent", "half_hello"])
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return "refused"
    try:
        if kind == "random":
            writer.write(os.urandom(rng.randint(1, 4096)))
        elif kind == "huge_length":
            writer.write(b"\xff\xff\xff\xff" + os.urandom(64))
        elif kind == "half_hello":
            writer.write(os.urandom(16))
        await writer.drain()
        await asyncio.sleep(rng.uniform(0.05, 1.5))
        return kind
    except OSError:
        return kind
    finally:
        writer.close()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bind", required=True)
    p.add_argument("--secret", type=Path, required=True, help="the cluster's secret file (for its mDNS tag)")
    p.add_argument("--target", action="append", default=[])
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--no-mdns", action="store_true")
    a = p.parse_args()
    rng = random.Random(1)
    zc = None if a.no_mdns else await hostile_records(a.bind, a.secret.read_bytes().strip())
    sent: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + a.seconds
    try:
        while loop.time() < deadline:
            jobs = []
            for target in a.target:
                host, port = target.rsplit(":", 1)
                jobs.append(garbage_connection(host, int(port), rng))
            for kind in await asyncio.gather(*jobs):
                sent[kind] = sent.get(kind, 0) + 1
            print(json.dumps({"garbage_connections": sent}), flush=True)  # the test may SIGTERM us any time
            await asyncio.sleep(0.1)
    finally:
        if zc is not None:
            await zc.async_close()
    print(json.dumps({"garbage_connections": sent}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
