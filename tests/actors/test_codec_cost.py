"""The cost of the largest legal frame (issue 17): refused in milliseconds, in little memory.

A 4 MiB header of empty maps used to cost about 284 MiB and about 3 s of event-loop time
(in `check_depth`), while every byte of it was within the limits. The decoder now counts
every container and item as it builds them (`Limits.max_total_items`) and stops at the
limit, so the work a frame can make is bounded by the limit, not by the header size.

The bounds below are generous: the point is orders of magnitude. Time is this thread's CPU
time, the least of three runs without tracemalloc (which multiplies the cost about
fivefold), so that other processes on a loaded 2-core machine cannot fail the test:
measured here, at most 33 ms CPU (empty arrays) against the old 3 s; one run in `make
test` took 232 ms while the other lane loaded its meshes.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

from actors import codec, message
from actors.codec import Limits
from actors.errors import CodecError, LimitExceeded

MAX_SECONDS = 0.25  # of thread CPU time: the old decoder took 3 s
MAX_PEAK_BYTES = 24 * 1024 * 1024


@message("test.cost.Empty")
@dataclass
class Empty:
    pass


def flat_header(element: bytes, limits: Limits = codec.DEFAULT_LIMITS) -> bytes:
    """The largest header of arrays (each of at most max_items) of `element`: within every limit."""
    budget = limits.max_header_size - 3
    per_array = limits.max_items
    arrays = []
    while budget > 5 + len(element):
        n = min(per_array, (budget - 5) // len(element))
        arrays.append(b"\xdd" + struct.pack(">I", n) + element * n)
        budget -= 5 + n * len(element)
    return b"\xdc" + struct.pack(">H", len(arrays)) + b"".join(arrays)


def nested_header(limits: Limits = codec.DEFAULT_LIMITS) -> bytes:
    """Arrays of arrays, 30 deep (under max_depth), as wide as the header allows."""
    leaf = b"\x91" * 28 + b"\x80"  # 28 one-element arrays around an empty map
    return flat_header(leaf, limits)


def ext_message(name: str) -> bytes:
    body = msgpack.packb([name, []])
    return msgpack.packb(msgpack.ExtType(codec.EXT_MESSAGE, body))


ATTACKS = {
    "empty-maps": lambda: flat_header(b"\x80"),
    "empty-arrays": lambda: flat_header(b"\x90"),
    "small-ints": lambda: flat_header(b"\x01"),
    "nested-arrays": nested_header,
    "empty-messages": lambda: flat_header(ext_message("test.cost.Empty")),
}


def _decode(prefix: bytes) -> Exception | None:
    try:
        codec.decode(prefix, [])
    except CodecError as exc:
        return exc
    return None


def cost(prefix: bytes, repeats: int = 3) -> tuple[float, int, Exception | None]:
    """(the least CPU seconds of ``repeats`` untraced decodes, peak traced bytes of one
    more, the error). The least: a neighbour's page-fault storm (the other lane loading
    GBs of layers) made one decode's CPU time 7x its usual."""
    elapsed = float("inf")
    for _ in range(repeats):
        started = time.thread_time()
        error = _decode(prefix)
        elapsed = min(elapsed, time.thread_time() - started)
    tracemalloc.start()
    _decode(prefix)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak, error


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_largest_legal_header_is_refused_cheaply(attack: str) -> None:
    header = ATTACKS[attack]()
    assert len(header) <= codec.DEFAULT_LIMITS.max_header_size
    prefix = b"\x00\x00" + header
    codec.parse_prefix(prefix)  # within the frame and header limits: only its content is too much
    elapsed, peak, error = cost(prefix)
    assert isinstance(error, LimitExceeded), error
    assert "items" in str(error)
    assert elapsed < MAX_SECONDS, f"{attack}: {elapsed * 1000:.0f} ms"
    assert peak < MAX_PEAK_BYTES, f"{attack}: peak {peak / 2**20:.1f} MiB"


def test_a_frame_at_the_item_limit_still_decodes() -> None:
    limits = codec.DEFAULT_LIMITS
    value = [[0] * 1000 for _ in range(limits.max_total_items // 1001 - 1)]
    parts = codec.encode(value)
    assert codec.decode(parts[0], []) == value


def test_the_item_limit_counts_across_nested_messages() -> None:
    per_message = codec.RECORD_COST + 3  # the record, its [name, fields] list and the empty fields
    limits = Limits(max_total_items=100 * per_message)
    ok = [Empty() for _ in range(90)]
    assert len(codec.decode(codec.encode(ok, limits)[0], [], limits)) == 90
    with pytest.raises(LimitExceeded, match="items"):
        codec.decode(codec.encode([Empty() for _ in range(110)], limits)[0], [], limits)


def test_a_peer_naming_torch_or_mlx_does_not_import_them() -> None:
    """In a fresh interpreter (this one may have torch loaded already): a frame that names
    a torch or an MLX tensor decodes to numpy and imports neither."""
    probe = (
        "import sys, numpy as np\n"
        "from actors import codec, tensors\n"
        "for kind in ('torch', 'mlx'):\n"
        "    out = tensors.from_wire([kind, 'float32', [2], '<'], np.zeros(2, np.float32).tobytes())\n"
        "    assert isinstance(out, np.ndarray), type(out)\n"
        "loaded = [m for m in ('torch', 'mlx', 'mlx.core') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
