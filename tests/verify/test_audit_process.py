"""The audit process: audits computed in a child give the in-process verdicts, and a
child never outlives its node (even one killed with SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kernels.sampling import SamplingParams
from mesh.testing.faults import parse_fault
from mesh.testing.verify_harness import Audit, run_pipeline
from mesh.verify.worker import AuditProcess


@pytest.mark.timeout(300)
def test_child_verdicts_equal_in_process_verdicts(stages, prompt, model_path):
    fault = parse_fault("stage=1:tamper:scale=0.01")
    _, traces = run_pipeline(stages, prompt, [("torch", "float32")] * 3, max_tokens=6, sampling=SamplingParams(),
                             fault=fault)
    for trace, want_ok in ((traces[0], True), (traces[1], False)):
        audit = Audit(stages, trace, "torch", SamplingParams())
        steps = sorted(trace.records)
        here = audit.check_many(steps)
        audit.close()
        audit.next_step = 0
        data = audit.data(steps)

        async def in_child():
            proc = AuditProcess(nice=0)
            try:
                skey = (trace.spec, "torch", "float32")
                digest = await proc.load(model_path, skey)
                assert digest == audit.stage.weights_digest
                return await proc.check(skey, "k", trace.records, data, steps, producer_backend=trace.backend,
                                        weight_mode=trace.weight_mode, last=trace.spec.head)
            finally:
                proc.close()

        there, cpu = asyncio.run(in_child())
        assert cpu > 0
        assert {s: v.ok for s, v in there.items()} == {s: v.ok for s, v in here.items()}
        if want_ok:  # the honest stage passes every step; the tampering one fails every decode step
            assert all(v.ok for v in there.values())
        else:
            assert not any(there[s].ok for s in steps[1:])
        assert [round(v.max_row_rel_l2, 6) for v in there.values()] == [round(v.max_row_rel_l2, 6)
                                                                         for v in here.values()]


SCRIPT = textwrap.dedent("""
    import asyncio, os, sys, time
    from mesh.verify.worker import AuditProcess

    async def main():
        proc = AuditProcess()
        pid = await asyncio.get_running_loop().run_in_executor(proc._executor(), os.getpid)
        print(pid, flush=True)
        time.sleep(60)

    asyncio.run(main())
""")


@pytest.mark.timeout(120)
def test_the_audit_process_dies_with_a_killed_node():
    node = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    try:
        child = int(node.stdout.readline())
        os.kill(child, 0)  # alive
        node.send_signal(signal.SIGKILL)
        node.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(child, signal.SIGKILL)
        pytest.fail("the audit process outlived its node")
    finally:
        if node.poll() is None:
            node.kill()


def _thread_policy() -> tuple[int, int]:
    import threading

    return os.sched_getscheduler(0), threading.get_native_id()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's idle scheduling class only")
@pytest.mark.skipif(os.environ.get("MESH_AUDIT_IDLE") == "0", reason="MESH_AUDIT_IDLE=0 turns the idle class off")
@pytest.mark.timeout(120)
def test_audits_run_in_the_idle_class_and_warm_loads_at_normal_priority(model_path):
    async def probe():
        proc = AuditProcess()
        try:
            await proc.warm("torch", model_path)  # imports torch and parses the model: on the loader thread
            pool = proc._executor()
            loop = asyncio.get_running_loop()
            compute = await loop.run_in_executor(pool, _thread_policy)
            loader = await loop.run_in_executor(pool, _loader_policy)
            return compute, loader
        finally:
            proc.close()

    (compute_policy, compute_tid), (loader_policy, loader_tid) = asyncio.run(probe())
    assert compute_policy == os.SCHED_IDLE
    assert loader_policy == os.SCHED_OTHER and loader_tid != compute_tid


def _loader_policy() -> tuple[int, int]:
    from mesh.verify import worker

    return worker._loader.submit(_thread_policy).result()


def _group_while_loading() -> str:
    from mesh.verify import worker

    def probe():
        with worker._normal_priority():
            return worker._group()

    return worker._loader.submit(probe).result()


@pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="Linux's autogroup only")
@pytest.mark.skipif(os.environ.get("MESH_AUDIT_IDLE") == "0", reason="MESH_AUDIT_IDLE=0 turns the idle class off")
@pytest.mark.timeout(120)
def test_the_audit_process_is_a_low_priority_group_of_its_own(model_path):
    """Under autogroup the idle class only yields inside a session: the child must leave
    the node's session, or its audits take a full share from other nodes' stages."""
    from mesh.verify import worker

    async def probe():
        proc = AuditProcess()
        try:
            child = await proc.warm("torch", model_path)
            loop = asyncio.get_running_loop()
            pool = proc._executor()
            return (child, await loop.run_in_executor(pool, worker._group),
                    await loop.run_in_executor(pool, _group_while_loading))
        finally:
            proc.close()

    child, idle_group, loading_group = asyncio.run(probe())
    assert os.getsid(child) == child != os.getsid(0)
    with open("/proc/self/autogroup") as f:
        mine = f.read().split()
    if not mine:  # the kernel reports no group for a task outside the root cgroup
        pytest.skip("this process is in no autogroup (a cgroup of its own, or autogroup off): "
                    "the group nice has no effect here")
    mine = mine[0]
    assert idle_group.split()[0] != mine
    assert idle_group.endswith(f"nice {worker.AUDIT_NICE}")
    assert loading_group.endswith("nice 0")
    assert asyncio.run(_groups_around_an_urgent_pass()) == [f"nice {worker.AUDIT_NICE}", "nice 0",
                                                            f"nice {worker.AUDIT_NICE}"]


def _group_in_pass(urgent: bool) -> str:
    from mesh.verify import worker

    with worker._pass_priority(urgent):  # what _check runs its pass in
        return worker._group()


async def _groups_around_an_urgent_pass() -> list[str]:
    """The group nice seen by a later pass, an urgent pass (as _check runs it), then a later one."""
    proc = AuditProcess()
    try:
        pool = proc._executor()
        loop = asyncio.get_running_loop()
        seen = [await loop.run_in_executor(pool, _group_in_pass, u) for u in (False, True, False)]
        return [" ".join(g.split()[1:]) for g in seen]
    finally:
        proc.close()
