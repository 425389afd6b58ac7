"""ComputeRunner keeps the loop responsive; generate is deterministic and stops right."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from kernels.generate import GenerationStats, agenerate, generate
from kernels.runner import ComputeRunner
from kernels.sampling import SamplingParams
from kernels.stage import StepInput


async def test_loop_stays_responsive_during_long_prefill(full_stage):
    ids = (np.arange(600) * 31 + 7) % 40000 + 10
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker():
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    with ComputeRunner() as runner:
        seen: list[int] = []

        def prefill():
            seen.append(threading.get_ident())
            return full_stage.forward([StepInput("long", 0, tokens=ids)])[0]

        task = asyncio.create_task(ticker())
        t0 = time.perf_counter()
        out = await runner.run(prefill)
        elapsed = time.perf_counter() - t0
        done.set()
        await task
        await runner.run(full_stage.free, "long")
    assert out.shape == (1, full_stage.config.vocab_size)
    assert seen == [runner.thread_id] and seen[0] != threading.get_ident()
    assert elapsed > 0.1  # the prefill was long enough to matter
    assert len(gaps) >= elapsed / 0.01 / 4  # the timer kept firing throughout
    # a stalled loop would show one gap as long as the prefill; allow scheduler noise
    assert max(gaps) < min(0.25, elapsed / 2), (max(gaps), elapsed)


def test_greedy_generate_stops_and_times(full_stage, chat_ids):
    stats = GenerationStats()
    toks = list(generate(full_stage, chat_ids[0], max_tokens=32, stats=stats))
    # "The capital of France is Paris." then <|im_end|> (eos id 2), which is not yielded
    assert stats.finish_reason == "stop" and 2 not in toks and len(toks) == stats.generated_tokens
    assert stats.ttft_s > 0 and stats.decode_tokens_per_s > 0 and stats.prompt_tokens == len(chat_ids[0])
    capped = list(generate(full_stage, chat_ids[0], max_tokens=3, stats=stats))
    assert capped == toks[:3] and stats.finish_reason == "length"


@pytest.mark.slow
def test_seeded_sampling_generation_is_reproducible(full_stage, chat_ids):
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=7)
    a = list(generate(full_stage, chat_ids[1], max_tokens=24, sampling=params, stop_ids=[]))
    b = list(generate(full_stage, chat_ids[1], max_tokens=24, sampling=params, stop_ids=[]))
    assert a == b and len(a) == 24
    c = list(generate(full_stage, chat_ids[1], max_tokens=24, stop_ids=[],
                      sampling=SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=8)))
    assert c != a


async def test_async_generate_equals_sync(full_stage, chat_ids):
    sync = list(generate(full_stage, chat_ids[2], max_tokens=8, stop_ids=[]))
    with ComputeRunner() as runner:
        out = [t async for t in agenerate(full_stage, chat_ids[2], runner, max_tokens=8, stop_ids=[])]
    assert out == sync


def test_generate_needs_full_stage(model_path):
    from kernels.loader import load_stage
    from kernels.stage import StageSpec

    st = load_stage(model_path, StageSpec(0, 2, embed=True))
    with pytest.raises(ValueError, match="full-model stage"):
        list(generate(st, [1, 2, 3]))
