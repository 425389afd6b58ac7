"""Inside the stages of real in-process nodes: a corrupted hop is caught by the digest
and retransmitted with no change to the output; a client that goes away frees the KV
cache on every stage, also when it leaves during the prefill; replays of a session
that is only slow do not multiply its work."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from reference import PROMPTS, Request

from actors.clock import LOOP_CLOCK
from mesh.generation import GenerationParams
from mesh.testing.inproc import InProcessMesh
from mesh.verify.service import VerifyConfig

pytestmark = [pytest.mark.timeout(300)]

TOKENS = 24


def flip_bit(array: np.ndarray, index: int, bit: int) -> np.ndarray:
    """A copy of ``array`` with one bit of one float32 element flipped."""
    out = np.array(array, dtype=np.float32, copy=True)
    out.reshape(-1).view(np.uint32)[index] ^= np.uint32(1 << bit)
    return out


class CorruptSends:
    """Wraps a stage's observer: flips one bit in the hidden tensor of chosen sends (by
    send number, while armed), after the sender computed its digest; and notes every
    session the stage computed."""

    def __init__(self, inner):
        self.inner = inner
        self.sessions: set[str] = set()
        self.faults: dict[int, int] = {}  # send number -> bit to flip (0: lowest mantissa bit, 30: exponent)
        self.calls = 0
        self.corrupted = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def outputs(self, epoch, results):
        self.sessions.update(msg.session for msg, _ in results)
        return self.inner.outputs(epoch, results)

    def wire(self, hidden: np.ndarray) -> np.ndarray:
        hidden = self.inner.wire(hidden)
        if not self.faults:
            return hidden
        n, self.calls = self.calls, self.calls + 1
        if n not in self.faults:
            return hidden
        self.corrupted += 1
        return flip_bit(hidden, index=n % hidden.size, bit=self.faults[n])


@pytest.fixture(scope="module")
def mesh(vrun, model_path):
    async def build() -> InProcessMesh:
        # verification off: the corrupted hops here are the test's, and two from one sender
        # would get it flagged and evicted (tests/inproc/test_verification.py checks that)
        m = InProcessMesh(seed=11, verify=VerifyConfig(enabled=False))
        for _ in range(3):
            await m.add(observe=lambda node, inner: CorruptSends(inner))
        await m.wait_ready(stages=3)
        return m

    m = vrun(build())
    yield m
    vrun(m.stop())


def _stages(mesh: InProcessMesh):
    """The nodes in pipeline order."""
    order = {s.node: s.index for s in mesh.nodes[0].plan.update.stages}
    return sorted(mesh.nodes, key=lambda n: order[n.node_id])


def _cache_lens(mesh: InProcessMesh) -> list[dict[str, int]]:
    """Per stage, in pipeline order: session -> cached positions (> 0), over every
    session the stage ever computed. Compute runs inline here, so the caches can be read
    between steps."""
    out = []
    for node in _stages(mesh):
        host = node.stage_host
        out.append({s: n for s in host.observer.sessions if (n := host.stage.cache_len(s)) > 0})
    return out


def test_corrupted_hops_are_detected_retransmitted_and_harmless(mesh, vrun, reference):
    prompt = PROMPTS[0]
    want = reference.tokens(Request(prompt, 0.0, max_tokens=TOKENS))
    nodes = _stages(mesh)
    hosts = [n.stage_host for n in nodes]
    before = [(h.stats.digest_mismatches, h.stats.retransmits_sent) for h in hosts]
    # Hop 0->1: the prefill (a tiny mantissa flip no model would notice) and a decode step
    # (an exponent flip that would wreck the output); hop 1->2: one decode step.
    faults = [hosts[0].observer, hosts[1].observer]
    faults[0].faults, faults[1].faults = {0: 0, 3: 30}, {5: 30}
    try:
        got = vrun(mesh.tokens(prompt, node=0, max_tokens=TOKENS))
    finally:
        faults[0].faults, faults[1].faults = {}, {}
    assert [f.corrupted for f in faults] == [2, 1]
    mismatches = [h.stats.digest_mismatches - b[0] for h, b in zip(hosts, before)]
    retransmits = [h.stats.retransmits_sent - b[1] for h, b in zip(hosts, before)]
    assert mismatches == [0, 2, 1]  # caught at the next stage
    assert retransmits == [2, 1, 0]  # and sent again, clean, by the stage that computed it
    assert got == want


def test_clean_run_has_no_mismatches(mesh, vrun, reference):
    """The digest check does not cry wolf: a clean run has no mismatch and no retransmit."""
    prompt = PROMPTS[1]
    hosts = [n.stage_host for n in mesh.nodes]
    before = [(h.stats.digest_mismatches, h.stats.retransmits_sent) for h in hosts]
    got = vrun(mesh.tokens(prompt, node=1, max_tokens=TOKENS))
    assert got == reference.tokens(Request(prompt, 0.0, max_tokens=TOKENS))
    assert [(h.stats.digest_mismatches, h.stats.retransmits_sent) for h in hosts] == before


def test_client_going_away_frees_kv_on_every_stage(mesh, vrun):
    serving_node = mesh.nodes[2]

    async def scenario():
        ids = serving_node.encode_chat([{"role": "user", "content": "Tell me a very long story about a dragon."}])
        events = serving_node.generate_stream(ids, GenerationParams.create(max_tokens=200))
        got = []
        async for event in events:
            got.append(event.token_id)
            if len(got) == 5:
                break
        held = _cache_lens(mesh)
        await events.aclose()  # what the API does when the client's connection drops
        await mesh.wait_for(lambda: all(not h for h in _cache_lens(mesh)) and not serving_node.serving.sessions,
                            timeout=10, what="every stage freed the session")
        return held

    held = vrun(scenario())
    assert [len(h) for h in held] == [1, 1, 1], held  # the session lived on all three stages
    assert _cache_lens(mesh) == [{}, {}, {}]


def test_client_going_away_during_prefill_frees_kv_on_every_stage(mesh, vrun):
    """The EndSession can overtake the session's prefill on its way down the pipeline;
    a stage must not keep a cache for a session that already ended."""
    serving_node = mesh.nodes[0]

    async def scenario():
        ids = serving_node.encode_chat([{"role": "user",
                                         "content": "Tell me a very long story about a dragon and a knight. " * 8}])
        for delay in (0.0, 0.0005, 0.001, 0.002, 0.01):  # virtual seconds: before, during, after hops
            async def consume() -> None:
                async for _ in serving_node.generate_stream(ids, GenerationParams.create(max_tokens=50)):
                    pass

            task = asyncio.create_task(consume())
            await LOOP_CLOCK.sleep(delay)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await LOOP_CLOCK.sleep(1.0)  # every step still in flight finishes its way around the ring
        await mesh.wait_for(lambda: all(not h for h in _cache_lens(mesh)), timeout=10,
                            what="every stage freed the cancelled sessions")

    vrun(scenario())
    assert _cache_lens(mesh) == [{}, {}, {}]
    assert all(not n.stage_host.meta for n in mesh.nodes)


def test_replays_of_a_slow_session_do_not_multiply_its_work(mesh, vrun, reference):
    """The serving node replays a session it thinks stalled (check_stalls) while its step
    is only slow; the replay and the old step then both come back around the ring. The
    first stage must keep one chain: else every replay doubles the session's work for
    good, and under load (steps slower than the stall timeout) the mesh collapses."""
    prompt = PROMPTS[4]
    want = reference.tokens(Request(prompt, 0.0, max_tokens=TOKENS))
    serving_node = mesh.nodes[1]
    first = _stages(mesh)[0].stage_host

    async def scenario():
        steps_before = first.stats.steps
        ids = serving_node.encode_chat([{"role": "user", "content": prompt}])
        got, replays = [], 0
        async for event in serving_node.generate_stream(ids, GenerationParams.create(max_tokens=TOKENS)):
            if not event.stop_token:
                got.append(event.token_id)
            if len(got) in (2, 4, 6) and replays < len(got) // 2:
                serving_node.serving.links_lost += 1  # as if a connection had dropped: replays are allowed
                replays += serving_node.serving.check_stalls(now=LOOP_CLOCK.now() + 3600)  # "stalled": replay it
        await LOOP_CLOCK.sleep(0.5)  # anything still in flight
        return got, replays, first.stats.steps - steps_before

    got, replays, steps = vrun(scenario())
    assert replays == 3
    assert got == want
    assert steps <= len(want) + 2 * replays, f"{steps} steps at stage 0 for {len(want)} tokens"
