"""Audit compute in a child process at low CPU priority.

A thread in the node's own process would share its GIL: each of the hundreds of small
Python steps of a pass can make the event loop (which forwards the pipeline's
activations) wait, and a low-priority thread preempted while holding the GIL stalls it
longer still. A child process has its own interpreter, so the node's loop never waits
on an audit; the OS gives the child's compute thread only CPU that the stages leave
(nice 19, ``MESH_AUDIT_NICE``, and on Linux the idle scheduling class,
``MESH_AUDIT_IDLE``), while imports, model parsing and stage loads run on a thread at
normal priority, so the first audits never wait behind them. On Linux the child also
leaves the node's session for one of its own: with autogroup the kernel shares the CPU
between sessions first, and the idle class would only yield to its own node. The child
holds the auditor's copies of the stages it audits and their audit KV caches; the parent keeps
only keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

AUDIT_NICE = int(os.environ.get("MESH_AUDIT_NICE", "19"))
IDLE_POLICY = os.environ.get("MESH_AUDIT_IDLE", "1") != "0"  # SCHED_IDLE for the compute thread, where there is one

StageKey = tuple  # (StageSpec, backend, weight mode)

_stages: dict = {}  # in the child: StageKey -> Stage
_loader: ThreadPoolExecutor | None = None  # in the child: loads at normal priority


def _init(nice: int, parent: int) -> None:
    global _loader
    os.environ["MESH_TORCH_THREADS"] = "1"  # one core at most; the stages keep theirs
    if IDLE_POLICY:
        _own_group()
    # Loading a stage is brief and on the way to the first audits (the plan just became
    # ready): it runs on a thread made before the compute thread lowers its priority
    # (Linux sets nice per thread; elsewhere the whole child is lowered).
    _loader = ThreadPoolExecutor(1, thread_name_prefix="audit-load")
    _loader.submit(int).result()
    try:
        os.nice(nice)
    except (AttributeError, OSError):
        pass
    if IDLE_POLICY and hasattr(os, "SCHED_IDLE"):
        # Linux's idle class: this thread runs only on a core nothing else wants, and any
        # stage thread that wakes takes the core back at once (nice 19 alone still gets a
        # share of a busy core, and stays on it until its slice ends)
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass
    threading.Thread(target=_exit_with, args=(parent,), name="audit-parent-watch", daemon=True).start()


def _own_group() -> None:
    """Leave the node's scheduling group. Linux with autogroup (the default on desktop
    distributions) first shares the CPU between sessions, and only then between the
    threads of one session: inside the node's session the idle class yields to the
    node's own stage, but the session as a whole competes with every other session on
    the machine as an equal, so an audit took its share from the stages of other nodes
    and programs. In a session of its own, whose group runs at nice 19 for later passes
    and at 0 while it loads or runs an urgent pass, it yields to them too. Without
    autogroup there is nothing to do."""
    try:
        os.setsid()
    except OSError:
        return
    _group_nice(AUDIT_NICE)


def _group_nice(nice: int) -> None:
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:  # no autogroup (macOS, a kernel without it, a cgroup of our own)
        pass


_raised = 0  # loads and urgent passes running now, each wanting the group at nice 0
_raised_lock = threading.Lock()


@contextlib.contextmanager
def _normal_priority():
    """The child's group at normal priority while a load or an urgent pass (a session's
    first, where a cheat shows first, or an escalation) runs: a flag must not wait for
    CPU the stages leave. Later passes, the bulk, run at nice 19."""
    global _raised
    with _raised_lock:
        _raised += 1
        if _raised == 1:
            _group_nice(0)
    try:
        yield
    finally:
        with _raised_lock:
            _raised -= 1
            if _raised == 0:
                _group_nice(AUDIT_NICE)


def _exit_with(parent: int) -> None:
    """A node killed with SIGKILL cannot stop its audit process: the child notices alone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _warm(backend: str, model_path: str) -> int:
    """Import the compute libraries and parse the model file now, at normal priority on
    the loader thread: a first load that still had to import torch (seconds) would hold
    back the first audits of the first plan."""
    _loader.submit(_import_and_parse, backend, model_path).result()
    return os.getpid()


def _pass_priority(urgent: bool):
    """The group's priority for one pass: normal for urgent ones, nice 19 otherwise."""
    return _normal_priority() if urgent else contextlib.nullcontext()


def _group() -> str:
    """The child's scheduling group, as Linux reports it (tests)."""
    try:
        with open("/proc/self/autogroup") as f:
            return f.read().strip()
    except OSError:
        return ""


def _import_and_parse(backend: str, model_path: str) -> None:
    with _normal_priority():
        import kernels.torch_backend.decoder  # noqa: F401  (torch; also the bf16 class's backend)
        import mesh.verify.auditor  # noqa: F401
        from kernels.config import load_config

        if backend == "mlx":
            import kernels.mlx_backend  # noqa: F401
        load_config(model_path)  # GGUF metadata is parsed once per process, here


def _load(model_path: str, skey: StageKey) -> bytes:
    if skey not in _stages:
        _stages[skey] = _loader.submit(_load_stage, Path(model_path), *skey).result()
    return _stages[skey].weights_digest


def _load_stage(path: Path, spec, backend: str, mode: str):
    from kernels.loader import load_stage

    with _normal_priority():
        return load_stage(path, spec, backend, mode)


def _free(skey: StageKey, key: str) -> None:
    stage = _stages.get(skey)
    if stage is not None:
        stage.free(key)


def _check(skey: StageKey, key: str, records: dict, data, steps: list[int], producer_backend: str,
           weight_mode: str, last: bool, urgent: bool = False) -> tuple[dict, float]:
    from mesh.verify.auditor import check_steps

    started = time.thread_time()
    with _pass_priority(urgent):
        verdicts = check_steps(_stages[skey], key, records, data, steps, producer_backend=producer_backend,
                               weight_mode=weight_mode, last=last)
    return verdicts, time.thread_time() - started


class AuditProcess:
    """The child process, started at the first use. A child that dies is replaced on the
    next call (its loaded stages and caches are gone: the caller starts its tracks over)."""

    def __init__(self, nice: int = AUDIT_NICE):
        self.nice = nice
        self._pool: ProcessPoolExecutor | None = None
        self.generation = 0  # bumped on every (re)start: caches of an older child are gone

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init, initargs=(self.nice, os.getpid()))
            self.generation += 1
        return self._pool

    async def _call(self, fn, *args):
        pool = self._executor()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = None
            raise

    async def warm(self, backend: str, model_path: Path) -> int:
        """Start the child, import the compute libraries and parse the model file, before
        the first plan needs them."""
        return await self._call(_warm, backend, str(model_path))

    async def load(self, model_path: Path, skey: StageKey) -> bytes:
        """Load the stage in the child; returns its weights digest."""
        return await self._call(_load, str(model_path), skey)

    async def free(self, skey: StageKey, key: str) -> None:
        await self._call(_free, skey, key)

    async def check(self, skey: StageKey, key: str, records: dict, data, steps: list[int], *,
                    producer_backend: str, weight_mode: str, last: bool, urgent: bool = False) -> tuple[dict, float]:
        """``check_steps`` in the child: (verdicts by step, CPU seconds it took there).
        ``urgent``: the child's group runs at normal priority meanwhile (Linux autogroup)."""
        return await self._call(_check, skey, key, records, data, steps, producer_backend, weight_mode, last, urgent)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class InlineAuditCompute:
    """`AuditProcess`'s interface, computing on the event loop's thread. Only for meshes
    on virtual time (``actors.clock.VirtualTimeLoop``), where a blocked loop costs no
    simulated time and one thread keeps a many-node test deterministic."""

    def __init__(self) -> None:
        self.generation = 1
        self._stages: dict[StageKey, object] = {}

    async def warm(self, backend: str, model_path: Path) -> int:
        return os.getpid()

    async def load(self, model_path: Path, skey: StageKey) -> bytes:
        if skey not in self._stages:
            from kernels.loader import load_stage

            self._stages[skey] = load_stage(Path(model_path), *skey)
        return self._stages[skey].weights_digest

    async def free(self, skey: StageKey, key: str) -> None:
        stage = self._stages.get(skey)
        if stage is not None:
            stage.free(key)

    async def check(self, skey: StageKey, key: str, records: dict, data, steps: list[int], *,
                    producer_backend: str, weight_mode: str, last: bool, urgent: bool = False) -> tuple[dict, float]:
        from mesh.verify.auditor import check_steps

        await asyncio.sleep(0)
        started = time.thread_time()
        verdicts = check_steps(self._stages[skey], key, records, data, steps, producer_backend=producer_backend,
                               weight_mode=weight_mode, last=last)
        return verdicts, time.thread_time() - started

    def close(self) -> None:
        self._stages.clear()
