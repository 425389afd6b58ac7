"""What a stranger can cost a node before authentication: prints one JSON object.

    python bench/trust.py [--quick]

- hellos: hellos per second one responder processes (sans-IO, one core), for genuine
  hellos (each costs an X25519 key, a DH and an Ed25519 signature: the accept), hellos
  made without the cluster secret (refused by their MAC) and a captured genuine hello
  replayed (refused by the replay guard). The ratios to the genuine rate are the point.
- flood: a stranger in another process floods a real ActorSystem over loopback TCP with
  hellos (without the secret, then replays of one genuine hello), as fast as it can on
  32 connections at once. Measured in the node's process: the hellos it refused per
  second, the connections it closed at once (the pending cap), and the event-loop lag
  (a 10 ms sleep's overshoot, p50/p99/max) against the same probe with no flood, run
  just before.
- frame: the cost (time, peak traced memory) of the largest legal frame of each hostile
  shape (tests/actors/test_codec_cost.py), against decoding a legal 4 MiB bytes header.
The machine may be shared: figures are noisy, ratios less so.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "actors"))

from actors import ActorSystem, NodeIdentity, codec  # noqa: E402
from actors.errors import HandshakeError  # noqa: E402
from actors.handshake import Handshake, ReplayGuard  # noqa: E402

QUICK = "--quick" in sys.argv
SECRET = b"bench trust secret 0123456789abcdef"
STRANGER = b"not the cluster secret, at all......"
CONCURRENCY = 32


def hello(secret: bytes) -> bytes:
    return Handshake(NodeIdentity.generate(), secret, True, ("127.0.0.1", 1)).start()


def rate(frames: list[bytes], guard: ReplayGuard, identity: NodeIdentity) -> float:
    """Hellos per second: a fresh responder handshake per hello, as a node makes one per connection."""
    started = time.perf_counter()
    for frame in frames:
        r = Handshake(identity, SECRET, False, None, replay=guard)
        try:
            r.receive_data(frame)
        except HandshakeError:
            pass
    return len(frames) / (time.perf_counter() - started)


def bench_hellos() -> dict:
    n = 300 if QUICK else 2000
    identity = NodeIdentity.generate()
    genuine = [hello(SECRET) for _ in range(n)]
    strangers = [hello(STRANGER) for _ in range(n)]
    captured = genuine[0]
    guard = ReplayGuard()
    out = {"hellos": n}
    best = {"genuine": 0.0, "no_secret": 0.0, "replayed": 0.0}
    for _ in range(3):
        guard = ReplayGuard()
        best["genuine"] = max(best["genuine"], rate(genuine, guard, identity))
        best["no_secret"] = max(best["no_secret"], rate(strangers, ReplayGuard(), identity))
        best["replayed"] = max(best["replayed"], rate([captured] * n, guard, identity))  # accepted before
    out.update({f"{k}_per_s": round(v) for k, v in best.items()})
    out["no_secret_vs_genuine"] = round(best["no_secret"] / best["genuine"], 1)
    out["replayed_vs_genuine"] = round(best["replayed"] / best["genuine"], 1)
    return out


# ---- the flood over real TCP --------------------------------------------------------------


async def flooder(host: str, port: int, seconds: float, mode: str) -> dict:
    """The stranger's side (run in its own process): hellos as fast as the node answers."""
    frame = hello(STRANGER) if mode == "no_secret" else hello(SECRET)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    counts = {"sent": 0, "refused": 0, "closed_at_once": 0, "answered": 0}

    async def one_connection() -> None:
        while loop.time() < deadline:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(frame)
                counts["sent"] += 1
                reply = await asyncio.wait_for(reader.read(4096), 5)
                writer.close()
            except (OSError, asyncio.TimeoutError):
                counts["closed_at_once"] += 1
                continue
            if b"refuse" in reply:
                counts["refused"] += 1
            elif reply:
                counts["answered"] += 1  # a replay's first use: the node accepted it once
            else:
                counts["closed_at_once"] += 1  # no answer: the cap, or a replay refused silently

    await asyncio.gather(*(one_connection() for _ in range(CONCURRENCY)))
    return counts


async def lag_probe(seconds: float) -> list[float]:
    loop = asyncio.get_running_loop()
    lags = []
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        t = loop.time()
        await asyncio.sleep(0.01)
        lags.append(loop.time() - t - 0.01)
    return lags


def summary(lags: list[float]) -> dict:
    lags = sorted(lags)
    return {
        "p50_ms": round(statistics.median(lags) * 1000, 2),
        "p99_ms": round(lags[int(len(lags) * 0.99) - 1] * 1000, 2),
        "max_ms": round(lags[-1] * 1000, 2),
    }


async def bench_flood() -> dict:
    seconds = 3.0 if QUICK else 8.0
    node = ActorSystem(NodeIdentity.generate(), SECRET, handshake_timeout=5.0)
    host, port = await node.start("127.0.0.1", 0)
    out: dict = {"seconds": seconds, "concurrency": CONCURRENCY}
    try:
        out["idle_lag"] = summary(await lag_probe(2.0 if QUICK else 4.0))
        for mode in ("no_secret", "replayed"):
            busy_before = node._gate.refused_busy
            refused_before = dict(node._gate.refused)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--flood", host, str(port), str(seconds), mode,
                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ROOT})
            lags = await lag_probe(seconds)
            stdout, _ = await proc.communicate()
            counts = json.loads(stdout)
            out[mode] = {
                **counts,
                "node_refused_per_s": round(sum(node._gate.refused.values()) - sum(refused_before.values()))
                                      // round(seconds),
                "hellos_per_s": round(counts["sent"] / seconds),
                "node_closed_at_once_cap": node._gate.refused_busy - busy_before,
                "node_refused": {k: v - refused_before.get(k, 0) for k, v in node._gate.refused.items()
                                 if v - refused_before.get(k, 0)},
                "lag": summary(lags),
                "p99_lag_vs_idle": round(summary(lags)["p99_ms"] / max(out["idle_lag"]["p99_ms"], 0.01), 1),
            }
    finally:
        await node.stop()
    return out


# ---- the largest legal frame --------------------------------------------------------------


def bench_frame() -> dict:
    from test_codec_cost import ATTACKS

    def measure(prefix: bytes) -> tuple[float, float]:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            try:
                codec.decode(prefix, [])
            except codec.CodecError:
                pass
            best = min(best, time.perf_counter() - t)
        tracemalloc.start()
        try:
            codec.decode(prefix, [])
        except codec.CodecError:
            pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return best, peak

    legal_body = b"\xc6" + (codec.DEFAULT_LIMITS.max_bin_len - 16).to_bytes(4, "big")
    legal = b"\x00\x00" + legal_body + bytes(codec.DEFAULT_LIMITS.max_bin_len - 16)
    base_s, base_peak = measure(legal)
    out = {"baseline_4MiB_bytes": {"ms": round(base_s * 1000, 2), "peak_MiB": round(base_peak / 2**20, 2)}}
    for name, build in sorted(ATTACKS.items()):
        s, peak = measure(b"\x00\x00" + build())
        out[name] = {"ms": round(s * 1000, 2), "peak_MiB": round(peak / 2**20, 2),
                     "vs_baseline": round(s / base_s, 1)}
    return out


async def main() -> None:
    import structlog

    # The node's log lines (rate-limited refusals) stay on, as in a real node, on stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    result = {"hellos": bench_hellos(), "frame": bench_frame(), "flood": await bench_flood()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--flood":
        _, _, host, port, seconds, mode = sys.argv
        print(json.dumps(asyncio.run(flooder(host, int(port), float(seconds), mode))))
    else:
        asyncio.run(main())
