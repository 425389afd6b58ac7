"""What an audit pass next door costs a decoding stage, measured in one run.

A 10-layer torch float32 stage decodes one position at a time in this process (one
compute thread, as a node's default on two cores) while a child process, in Linux's idle
scheduling class like the audit process, works on the other core: a busy loop without
memory traffic, one-row forward passes (memory-bound, like a decode step), or
prefill-shaped passes of 24 and 64 rows (dense arithmetic, like an audit pass). The
child is paused and resumed in turn, so each block of decode steps next to it is paired
with a block right before it with the child paused: the machine's drift cancels. Prints
JSON: per neighbour, the median decode step in ms alone and beside it, and the median
of the paired ratios.

    python bench/audit_contention.py [--pairs 8] [--steps 20]
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
KINDS = ["spin", "1-row", "24-row", "64-row"]


def _stage():
    from kernels.loader import load_stage
    from kernels.stage import StageSpec
    from mesh import models

    return load_stage(models.resolve(models.DEFAULT_MODEL, fetch=True), StageSpec(*SPEC), backend="torch")


def _neighbour(kind: str, ready, running, stop) -> None:
    import numpy as np

    from kernels.stage import StepInput

    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    stage = None if kind == "spin" else _stage()
    x = np.ones((1 if stage is None else int(kind.split("-")[0]), 576), np.float32)
    ready.set()
    i = 0
    while not stop.is_set():
        if not running.wait(0.05):
            continue
        if stage is None:
            continue
        key = f"n{i}"
        stage.forward([StepInput(key, 0, hidden=x)])
        stage.free(key)
        i += 1


class _Decoder:
    def __init__(self, stage):
        import numpy as np

        from kernels.stage import StepInput

        self.stage, self.np, self.StepInput = stage, np, StepInput
        self.pos = 0
        self._restart()

    def _restart(self) -> None:
        self.stage.free("d")
        self.stage.forward([self.StepInput("d", 0, hidden=self.np.ones((40, 576), self.np.float32))])
        self.pos = 40

    def block_ms(self, steps: int) -> float:
        if self.pos + steps > 400:
            self._restart()
        x = self.np.ones((1, 576), self.np.float32)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            self.stage.forward([self.StepInput("d", self.pos, hidden=x)])
            times.append(time.perf_counter() - started)
            self.pos += 1
        return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8, help="paused/running block pairs per neighbour")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per block")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    decoder = _Decoder(_stage())
    decoder.block_ms(10)  # warm-up
    out = {"stage_layers": list(SPEC), "steps_per_block": args.steps, "neighbours": {}}
    for kind in KINDS:
        ready, running, stop = ctx.Event(), ctx.Event(), ctx.Event()
        proc = ctx.Process(target=_neighbour, args=(kind, ready, running, stop), daemon=True)
        proc.start()
        ready.wait(120)
        alone, beside, ratios = [], [], []
        try:
            for _ in range(args.pairs):
                running.clear()
                time.sleep(0.2)
                a = decoder.block_ms(args.steps)
                running.set()
                time.sleep(0.2)
                b = decoder.block_ms(args.steps)
                alone.append(a)
                beside.append(b)
                ratios.append(b / a)
        finally:
            stop.set()
            running.set()
            proc.join(30)
        out["neighbours"][kind] = {"decode_step_ms_alone": round(statistics.median(alone), 2),
                                   "decode_step_ms_beside": round(statistics.median(beside), 2),
                                   "ratio": round(statistics.median(ratios), 3),
                                   "ratio_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
