"""Inside the stages (in-process, real StageHosts and Serving, messages through the
wire codec): a corrupted hop is caught by the digest and retransmitted with no change
to the output; a client that goes away frees the KV cache on every stage, also when it
leaves during the prefill.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import pytest_asyncio
from inproc import InProcessPipeline, flip_bit
from meshtest import PROMPTS, Request

from mesh.generation import GenerationParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180), pytest.mark.asyncio(loop_scope="module")]

TOKENS = 24


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pipeline(model_path):
    pipe = InProcessPipeline(model_path, [(0, 10), (10, 20), (20, 30)])
    await pipe.start()
    yield pipe
    await pipe.stop()


class CorruptSends:
    """A StageHost wire_fault: flips one bit in the hidden tensor of chosen sends (by
    send number), after the sender computed its digest; other sends pass unchanged."""

    def __init__(self, faults: dict[int, int]):
        self.faults = faults  # send number -> bit to flip (0: lowest mantissa bit, 30: exponent)
        self.calls = 0
        self.corrupted = 0

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        n, self.calls = self.calls, self.calls + 1
        if n not in self.faults:
            return hidden
        self.corrupted += 1
        return flip_bit(hidden, index=n % hidden.size, bit=self.faults[n])


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)


async def test_corrupted_hops_are_detected_retransmitted_and_harmless(pipeline, reference):
    prompt = PROMPTS[0]
    want = reference.tokens(Request(prompt, 0.0, max_tokens=TOKENS))
    hosts = [pipeline.hosts[n] for n in pipeline.nodes]
    before = [(h.stats.digest_mismatches, h.stats.retransmits_sent) for h in hosts]
    # Hop 0->1: the prefill (a tiny mantissa flip no model would notice) and a decode step
    # (an exponent flip that would wreck the output); hop 1->2: one decode step.
    faults = [CorruptSends({0: 0, 3: 30}), CorruptSends({5: 30})]
    hosts[0].wire_fault, hosts[1].wire_fault = faults
    try:
        got = await asyncio.wait_for(pipeline.generate(prompt, max_tokens=TOKENS), 120)
    finally:
        hosts[0].wire_fault = hosts[1].wire_fault = None
    assert [f.corrupted for f in faults] == [2, 1]
    mismatches = [h.stats.digest_mismatches - b[0] for h, b in zip(hosts, before)]
    retransmits = [h.stats.retransmits_sent - b[1] for h, b in zip(hosts, before)]
    assert mismatches == [0, 2, 1]  # caught at the next stage
    assert retransmits == [2, 1, 0]  # and sent again, clean, by the stage that computed it
    assert got == want


async def test_clean_run_has_no_mismatches(pipeline, reference):
    """The digest check does not cry wolf: a clean run has no mismatch and no retransmit."""
    prompt = PROMPTS[1]
    hosts = [pipeline.hosts[n] for n in pipeline.nodes]
    before = [(h.stats.digest_mismatches, h.stats.retransmits_sent) for h in hosts]
    got = await asyncio.wait_for(pipeline.generate(prompt, max_tokens=TOKENS), 120)
    assert got == reference.tokens(Request(prompt, 0.0, max_tokens=TOKENS))
    assert [(h.stats.digest_mismatches, h.stats.retransmits_sent) for h in hosts] == before


async def _no_caches(pipeline) -> bool:
    lens = await pipeline.cache_lens()
    return all(not held for held in lens.values()) and all(not h.meta for h in pipeline.hosts.values())


async def test_client_going_away_frees_kv_on_every_stage(pipeline):
    ids = pipeline.encode_chat("Tell me a very long story about a dragon and a knight.")
    events = pipeline.serving.generate(ids, GenerationParams(max_tokens=200))
    got = []
    async for event in events:
        got.append(event.token_id)
        if len(got) == 5:
            break
    lens = await pipeline.cache_lens()
    assert all(len(held) == 1 for held in lens.values()), lens  # the session lives on all three stages
    await events.aclose()  # what the API does when the client's connection drops
    await _wait_for(lambda: _no_caches(pipeline), timeout=10)
    assert await pipeline.cache_lens() == {n: {} for n in pipeline.nodes}
    assert not pipeline.serving.sessions


async def test_client_going_away_during_prefill_frees_kv_on_every_stage(pipeline):
    """The EndSession can overtake the session's prefill on its way down the pipeline;
    a stage must not keep a cache for a session that already ended."""
    for delay in (0.0, 0.02, 0.05, 0.1):
        ids = pipeline.encode_chat("Tell me a very long story about a dragon and a knight. " * 8)

        async def consume() -> None:
            async for _ in pipeline.serving.generate(ids, GenerationParams(max_tokens=50)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # Let every step still in flight finish its way around the ring.
    await asyncio.sleep(1.0)
    await _wait_for(lambda: _no_caches(pipeline), timeout=10)
    assert await pipeline.cache_lens() == {n: {} for n in pipeline.nodes}
    assert all(not h.meta for h in pipeline.hosts.values())


async def test_replays_of_a_slow_session_do_not_multiply_its_work(pipeline, reference):
    """The serving node replays a session it thinks stalled (check_stalls) while its step
    is only slow; the replay and the old step then both come back around the ring. The
    first stage must keep one chain: else every replay doubles the session's work for
    good, and under load (steps slower than the stall timeout) the mesh collapses."""
    prompt = PROMPTS[4]
    want = reference.tokens(Request(prompt, 0.0, max_tokens=TOKENS))
    first = pipeline.hosts[pipeline.nodes[0]]
    steps_before = first.stats.steps
    events = pipeline.serving.generate(pipeline.encode_chat(prompt), GenerationParams(max_tokens=TOKENS))
    got, replays = [], 0
    async for event in events:
        if not event.stop_token:
            got.append(event.token_id)
        if len(got) in (2, 4, 6) and replays < len(got) // 2:
            pipeline.serving.links_lost += 1  # as if a connection had dropped: replays are allowed
            replays += pipeline.serving.check_stalls(now=time.monotonic() + 3600)  # "stalled": replay it
    assert replays == 3
    assert got == want
    await asyncio.sleep(0.5)  # anything still in flight
    steps = first.stats.steps - steps_before
    assert steps <= len(want) + 2 * replays, f"{steps} steps at stage 0 for {len(want)} tokens"
