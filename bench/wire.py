"""Wire benchmark for `actors`: prints one JSON object. All baselines are measured in the same run.

    python bench/wire.py [--quick]

- codec: encode+decode of a message holding one tensor (4 KiB, 1 MiB, 64 MiB), plain and
  encrypted (seal + open) with each record cipher, as a ratio to a plain memory copy.
- tcp: loopback throughput of 1 MiB tensors between two actor systems (encryption on,
  with the cipher they negotiate, and again forced to ChaCha20-Poly1305) and its ratio
  to a raw unencrypted socket send of the same bytes, in the same process.
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

from actors import Actor, ActorSystem, NodeIdentity, ciphers, codec, message, run  # noqa: E402
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

        t_copy, t_plain = _best(copy, reps), _best(plain, reps)
        mb = nbytes * inner / 1e6
        row = out[label] = {
            "memcpy_MBps": round(mb / t_copy),
            "codec_MBps": round(mb / t_plain),
            "codec_vs_memcpy": round(t_copy / t_plain, 3),
            "codec_us_per_msg": round(t_plain / inner * 1e6, 1),
        }
        for cipher in ciphers.KNOWN:
            tx = SecureChannel(key, key, b"AAAA", b"AAAA", cipher=cipher)
            rx = SecureChannel(key, key, b"AAAA", b"AAAA", cipher=cipher)

            def secure() -> None:
                for _ in range(inner):
                    for rec in tx.send(Blob(1, arr)):
                        rx.receive_data(rec)
                    assert rx.next_message() is not None

            t_secure = _best(secure, reps)
            row[f"encrypted_{cipher}_MBps"] = round(mb / t_secure)
            row[f"encrypted_{cipher}_vs_memcpy"] = round(t_copy / t_secure, 3)
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


async def _pair(offer: tuple[str, ...] | None) -> tuple[ActorSystem, ActorSystem, str, Sink]:
    secret = os.urandom(32)
    a = ActorSystem(NodeIdentity.generate(), secret, ciphers=offer)
    b = ActorSystem(NodeIdentity.generate(), secret, ciphers=offer)
    await a.start("127.0.0.1", 0)
    await b.start("127.0.0.1", 0)
    sink = Sink()
    a.spawn(sink, name="sink", mailbox_size=64)
    a.spawn(Echo(), name="echo")
    peer = await b.connect(*a.address)
    return a, b, peer, sink


async def _throughput(b: ActorSystem, peer: str, sink: Sink, arr: np.ndarray, count: int) -> float:
    ref = b.ref(peer, "sink")
    for _ in range(10):  # warm up
        await ref.send(Blob(0, arr))
    await ref.ask("sync", timeout=30)
    start_bytes = sink.bytes
    t = time.perf_counter()
    for i in range(count):
        await ref.send(Blob(i, arr))
    total = await ref.ask("sync", timeout=60) - start_bytes
    return total / (time.perf_counter() - t) / 1e6


async def bench_tcp() -> dict:
    arr = np.random.default_rng(1).integers(0, 255, 1 << 20, dtype=np.uint8)
    count = 100 if QUICK else 300
    ca, cb, cpeer, csink = await _pair((ciphers.CHACHA,))
    a, b, peer, sink = await _pair(None)  # what two nodes of this machine negotiate
    cipher = b.cipher_of(peer)
    enc, chacha, raw = [], [], []
    for _ in range(3):  # interleaved, so that load from other processes hits all three alike
        enc.append(await _throughput(b, peer, sink, arr, count))
        chacha.append(await _throughput(cb, cpeer, csink, arr, count))
        raw.append(await bench_raw_socket(arr.tobytes(), count))
    await cb.stop()
    await ca.stop()
    enc_mbps, chacha_mbps, raw_mbps = (float(np.median(x)) for x in (enc, chacha, raw))

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
        "cipher": cipher,
        "ciphers_supported": list(ciphers.supported()),
        "tcp_1MiB_encrypted_MBps": round(enc_mbps),
        "tcp_1MiB_chacha20poly1305_MBps": round(chacha_mbps),
        "tcp_raw_socket_MBps": round(raw_mbps),
        "tcp_encrypted_vs_raw": round(enc_mbps / raw_mbps, 3),
        "tcp_chacha20poly1305_vs_raw": round(chacha_mbps / raw_mbps, 3),
        "tcp_runs": 3,
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
