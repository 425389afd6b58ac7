"""Wire benchmark for `actors`: prints one JSON object. All baselines are measured in the same run.

    python bench/wire.py [--quick]

- codec: encode+decode of a message holding one tensor (4 KiB, 1 MiB, 64 MiB), plain and
  encrypted (seal + open), as a ratio to a plain memory copy of the same bytes.
- tcp: loopback throughput of 1 MiB tensors between two actor systems (encryption on)
  and its ratio to a raw unencrypted socket send of the same bytes, in the same process.
- ask: small-message round-trip latency p50/p99 over loopback, and one-way messages/s.
The machine may be shared: figures are noisy, ratios less so.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors import Actor, ActorSystem, NodeIdentity, codec, message, run  # noqa: E402
from actors.secure import SecureChannel  # noqa: E402

QUICK = "--quick" in sys.argv


@message("bench.Blob")
@dataclass
class Blob:
    seq: int
    data: np.ndarray


def _best(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_codec() -> dict:
    out = {}
    key = os.urandom(32)
    tx = SecureChannel(key, key, b"AAAA", b"AAAA")
    for label, nbytes in (("4KiB", 4096), ("1MiB", 1 << 20), ("64MiB", 64 << 20)):
        arr = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).view(np.float32)
        inner = max(1, (8 << 20) // nbytes)
        reps = 3 if nbytes >= 64 << 20 else 7

        dst = np.empty(nbytes, np.uint8)
        src = arr.view(np.uint8)

        def copy() -> None:
            for _ in range(inner):
                np.copyto(dst, src)

        def plain() -> None:
            for _ in range(inner):
                parts = codec.encode(Blob(1, arr))
                codec.decode(parts[0], parts[1:])

        rx = SecureChannel(key, key, b"AAAA", b"AAAA")

        def secure() -> None:
            for _ in range(inner):
                for rec in tx.send(Blob(1, arr)):
                    rx.receive_data(rec)
                assert rx.next_message() is not None

        rx._recv_counter = tx._send_counter
        t_copy, t_plain = _best(copy, reps), _best(plain, reps)
        rx._recv_counter = tx._send_counter
        t_secure = _best(secure, reps)
        mb = nbytes * inner / 1e6
        out[label] = {
            "memcpy_MBps": round(mb / t_copy),
            "codec_MBps": round(mb / t_plain),
            "codec_vs_memcpy": round(t_copy / t_plain, 3),
            "encrypted_codec_MBps": round(mb / t_secure),
            "encrypted_codec_vs_memcpy": round(t_copy / t_secure, 3),
        }
    return out


class Sink(Actor):
    def __init__(self) -> None:
        self.bytes = 0

    async def receive(self, msg, ctx):
        if isinstance(msg, Blob):
            self.bytes += msg.data.nbytes
            return None
        return self.bytes


class Echo(Actor):
    async def receive(self, msg, ctx):
        return msg


async def bench_raw_socket(payload: bytes, count: int) -> float:
    done = asyncio.get_running_loop().create_future()
    total = len(payload) * count

    class Reader(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(256 * 1024)
            self.got = 0

        def get_buffer(self, n):
            return self.buf

        def buffer_updated(self, n):
            self.got += n
            if self.got >= total and not done.done():
                done.set_result(None)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Reader, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    t = time.perf_counter()
    for _ in range(count):
        writer.write(payload)
        await writer.drain()
    await done
    dt = time.perf_counter() - t
    writer.close()
    server.close()
    return total / dt / 1e6


async def bench_tcp() -> dict:
    secret = os.urandom(32)
    a = ActorSystem(NodeIdentity.generate(), secret)
    b = ActorSystem(NodeIdentity.generate(), secret)
    await a.start("127.0.0.1", 0)
    await b.start("127.0.0.1", 0)
    sink = Sink()
    a.spawn(sink, name="sink", mailbox_size=64)
    a.spawn(Echo(), name="echo")
    peer = await b.connect(*a.address)
    ref = b.ref(peer, "sink")
    arr = np.random.default_rng(1).integers(0, 255, 1 << 20, dtype=np.uint8)
    count = 100 if QUICK else 300
    for _ in range(10):  # warm up
        await ref.send(Blob(0, arr))
    await ref.ask("sync", timeout=30)
    start_bytes = sink.bytes
    t = time.perf_counter()
    for i in range(count):
        await ref.send(Blob(i, arr))
    total = await ref.ask("sync", timeout=60) - start_bytes
    enc_mbps = total / (time.perf_counter() - t) / 1e6
    raw_mbps = await bench_raw_socket(arr.tobytes(), count)

    echo = b.ref(peer, "echo")
    for _ in range(200):
        await echo.ask(1)
    n = 1000 if QUICK else 3000
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        await echo.ask(i)
        lat.append(time.perf_counter() - t0)
    lat_us = np.array(lat) * 1e6
    sref = b.ref(peer, "sink")
    m = 5000 if QUICK else 20000
    t = time.perf_counter()
    for i in range(m):
        await sref.send(i)
    await sref.ask("sync", timeout=30)
    msgs_per_s = m / (time.perf_counter() - t)
    await b.stop()
    await a.stop()
    return {
        "tcp_1MiB_encrypted_MBps": round(enc_mbps),
        "tcp_raw_socket_MBps": round(raw_mbps),
        "tcp_encrypted_vs_raw": round(enc_mbps / raw_mbps, 3),
        "tcp_goal_MBps": 500,
        "ask_rtt_p50_us": round(float(np.percentile(lat_us, 50)), 1),
        "ask_rtt_p99_us": round(float(np.percentile(lat_us, 99)), 1),
        "ask_rtt_goal_p50_us": 150,
        "one_way_msgs_per_s": round(msgs_per_s),
        "asks_per_s": round(n / (lat_us.sum() / 1e6)),
    }


def main() -> None:
    from actors import log

    log.configure(level="WARNING")
    t0 = time.perf_counter()
    result: dict = {"bench": "wire"}
    try:
        import uvloop  # noqa: F401

        result["loop"] = "uvloop"
    except ImportError:
        result["loop"] = "asyncio"
    result["codec"] = bench_codec()
    result.update(run(bench_tcp()))
    result["cpus"] = os.cpu_count()
    result["note"] = "both ends in one process on a shared machine: figures are noisy; ratios are the comparable part"
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
