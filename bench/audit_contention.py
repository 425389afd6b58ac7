"""What an audit pass next door costs a decoding stage, measured in one run.

A 10-layer torch float32 stage decodes one position at a time in this process (one
compute thread, as a node's default on two cores) while a child process, in Linux's idle
scheduling class like the audit process, runs on the other core: nothing, a busy loop
without memory traffic, one-row forward passes (memory-bound, like a decode step), or
prefill-shaped passes of 24 and 64 rows (dense arithmetic, like an audit pass). Prints
JSON: the median decode step in ms per neighbour and its ratio to decoding alone
(baselines measured before, between and after the others, the median taken).

    python bench/audit_contention.py [--steps 60] [--settle 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MESH_TORCH_THREADS", "1")

SPEC = (10, 20)


def _stage():
    from kernels.stage import StageSpec, load_stage
    from mesh import models

    return load_stage(models.resolve(models.DEFAULT_MODEL, fetch=True), StageSpec(*SPEC), backend="torch")


def _neighbour(kind: str, ready, stop) -> None:
    import numpy as np

    from kernels.stage import StepInput

    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    stage = None if kind == "spin" else _stage()
    rows = 0 if kind == "spin" else int(kind.split("-")[0])
    x = np.ones((max(rows, 1), 576), np.float32)
    ready.set()
    i = 0
    while not stop.is_set():
        if stage is None:
            continue
        key = f"n{i}"
        stage.forward([StepInput(key, 0, hidden=x)])
        stage.free(key)
        i += 1


def _decode_ms(stage, steps: int) -> float:
    import numpy as np

    from kernels.stage import StepInput

    stage.forward([StepInput("d", 0, hidden=np.ones((40, 576), np.float32))])
    x = np.ones((1, 576), np.float32)
    times = []
    for p in range(steps):
        started = time.perf_counter()
        stage.forward([StepInput("d", 40 + p, hidden=x)])
        times.append(time.perf_counter() - started)
    stage.free("d")
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="decode steps per measurement")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds the neighbour runs before measuring")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    stage = _stage()
    _decode_ms(stage, 10)  # warm-up
    order = ["alone", "spin", "1-row", "alone", "24-row", "64-row", "alone"]
    measured: dict[str, list[float]] = {}
    for kind in order:
        proc = None
        stop = ctx.Event()
        if kind != "alone":
            ready = ctx.Event()
            proc = ctx.Process(target=_neighbour, args=(kind, ready, stop), daemon=True)
            proc.start()
            ready.wait(120)
            time.sleep(args.settle)
        try:
            measured.setdefault(kind, []).append(_decode_ms(stage, args.steps))
        finally:
            if proc is not None:
                stop.set()
                proc.join(30)
    alone = statistics.median(measured["alone"])
    out = {"stage_layers": list(SPEC), "decode_step_ms_alone": round(alone, 2),
           "alone_samples_ms": [round(v, 2) for v in measured["alone"]], "neighbours": {}}
    for kind, values in measured.items():
        if kind != "alone":
            out["neighbours"][kind] = {"decode_step_ms": round(values[0], 2), "ratio_to_alone": round(values[0] / alone, 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
