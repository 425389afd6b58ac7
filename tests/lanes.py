"""`make test`: the whole suite as two lanes of pytest processes running at once.

    python tests/lanes.py [extra pytest args...]

On this 2-core machine no group of the suite keeps both cores busy: the real-process
tests mostly wait on their nodes (about 1.2 cores), the kernel checks compute on about one.
So two lanes run side by side, each a sequence of pytest processes:

- lane 1: everything outside tests/inproc and tests/kernels (real processes, namespaces),
  the rest of tests/kernels, then the real-model checks (tests/kernels/test_real_models.py),
  which so never meet the real-process group (beside it they took the machine to 21.3 of
  its 23 GB);
- lane 2: the rest of tests/inproc, then the in-process meshes on the larger models
  (tests/inproc/test_real_models_mesh.py).

The in-process meshes and the real-model checks each hold GBs of layers, so they are
separate processes (a process that ran every mesh reached 14.6 GB and was OOM-killed) and
never run at the same moment: `memory_lock.exclusive()`, taken by all three, makes one
wait for another if they meet. Measured on this machine (serial, one
process each): the first group 380 s at 1.2 cores, tests/kernels 404 s at 1.0,
tests/inproc about 210 s.

A lane's output is printed whole when it ends (lanes do not interleave), with its wall
time; the exit status is non-zero if any pytest process failed. Every pytest process runs
even when an earlier one failed, so one run shows every failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

REAL_MODELS = "tests/kernels/test_real_models.py"
REAL_MODEL_MESHES = "tests/inproc/test_real_models_mesh.py"
LANES: list[list[list[str]]] = [
    [["tests", "--ignore=tests/inproc", "--ignore=tests/kernels"], ["tests/kernels", f"--ignore={REAL_MODELS}"],
     [REAL_MODELS]],
    [["tests/inproc", f"--ignore={REAL_MODEL_MESHES}"], [REAL_MODEL_MESHES]],
]


class Lane:
    def __init__(self, index: int, steps: list[list[str]], extra: list[str], log_dir: Path, env: dict):
        self.index, self.steps, self.extra, self.env = index, list(steps), extra, env
        self.log_path = log_dir / f"lane{index + 1}.log"
        self.log = open(self.log_path, "wb")
        self.proc: subprocess.Popen | None = None
        self.codes: list[int] = []
        self.started = time.monotonic()
        self.ended: float | None = None

    def poll(self) -> bool:
        """Advance the lane; True once its last step has ended."""
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                return False
            self.codes.append(code)
            self.proc = None
        if not self.steps:
            if self.ended is None:
                self.ended = time.monotonic()
                self.log.close()
            return True
        args = [sys.executable, "-m", "pytest", "-q", *self.steps.pop(0), *self.extra]
        self.log.write(f"$ {' '.join(args[1:])}\n".encode())
        self.log.flush()
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main(extra: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="mesh-lanes-") as tmp:
        log_dir = Path(tmp)
        env = {**os.environ, "MESH_TEST_MEMORY_LOCK": str(log_dir / "memory.lock")}
        lanes = [Lane(i, steps, extra, log_dir, env) for i, steps in enumerate(LANES)]
        started = time.monotonic()
        shown: set[int] = set()
        try:
            while len(shown) < len(lanes):
                for lane in lanes:
                    if lane.index not in shown and lane.poll():
                        shown.add(lane.index)
                        took = lane.ended - lane.started
                        print(f"===== lane {lane.index + 1} ({len(lane.codes)} pytest runs, {took:.0f} s) =====",
                              flush=True)
                        sys.stdout.write(lane.log_path.read_text(errors="replace"))
                        sys.stdout.flush()
                time.sleep(0.2)
        except KeyboardInterrupt:
            for lane in lanes:
                lane.stop()
            return 130
        codes = [c for lane in lanes for c in lane.codes]
        print(f"===== all lanes: {time.monotonic() - started:.0f} s, pytest exit codes {codes} =====")
        # a pytest process killed by a signal (the OOM killer: -9) fails the run too
        return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
