"""Single-device generation over a full-model Stage (layers 0..n, embed + head).

Token ids in, token ids out, one at a time; the tokenizer lives elsewhere
(``kernels.tokenizer``). This loop is the reference the mesh pipeline is checked
against: the token at sequence position ``p`` is ``sample(logits, params, p)``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from kernels.runner import ComputeRunner
from kernels.sampling import GREEDY, SamplingParams, sample
from kernels.stage import Stage, StepInput


@dataclass
class GenerationStats:
    """Filled in while a generation runs; read it after (or during) iteration."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0  # prompt in -> first token out (prefill + sampling)
    decode_s: float = 0.0  # time spent producing tokens after the first
    finish_reason: str = ""  # "stop" (an eos id) or "length" (max_tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def _check_full(stage: Stage) -> None:
    s = stage.spec
    if not (s.embed and s.head and s.start == 0 and s.end == stage.config.n_layers):
        raise ValueError(f"generate needs a full-model stage (0..{stage.config.n_layers}, "
                         f"embed and head); got {s}")


def _setup(stage: Stage, prompt_ids: Iterable[int], stop_ids: Iterable[int] | None):
    _check_full(stage)
    prompt = np.asarray(list(prompt_ids), dtype=np.int64)
    if prompt.size == 0:
        raise ValueError("generate needs at least one prompt token")
    stops = set(stage.config.eos_token_ids if stop_ids is None else stop_ids)
    return prompt, stops


def generate(stage: Stage, prompt_ids: Iterable[int], *, max_tokens: int = 256,
             sampling: SamplingParams = GREEDY, stop_ids: Iterable[int] | None = None,
             stats: GenerationStats | None = None, session: str | None = None) -> Iterator[int]:
    """Yield generated token ids; stops before yielding a stop id (default: the
    model's eos ids) or after ``max_tokens``. The session's cache is freed at the end."""
    prompt, stops = _setup(stage, prompt_ids, stop_ids)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = int(prompt.size)
    session = session or f"gen-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    step = StepInput(session, 0, tokens=prompt)
    try:
        for i in range(max_tokens):
            logits = stage.forward([step])[0]
            pos = int(prompt.size) + i
            token = sample(logits[-1], sampling, pos)
            now = time.perf_counter()
            if i == 0:
                stats.ttft_s = now - t0
                t_first = now
            else:
                stats.decode_s = now - t_first
            if token in stops:
                stats.finish_reason = "stop"
                return
            stats.generated_tokens = i + 1
            yield token
            step = StepInput(session, pos, tokens=np.array([token], dtype=np.int64))
        stats.finish_reason = "length"
    finally:
        stage.free(session)


async def agenerate(stage: Stage, prompt_ids: Iterable[int], runner: ComputeRunner, *,
                    max_tokens: int = 256, sampling: SamplingParams = GREEDY,
                    stop_ids: Iterable[int] | None = None, stats: GenerationStats | None = None,
                    session: str | None = None) -> AsyncIterator[int]:
    """``generate`` with every step (forward + sampling) on the runner's compute thread."""
    prompt, stops = _setup(stage, prompt_ids, stop_ids)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = int(prompt.size)
    session = session or f"gen-{uuid.uuid4().hex[:8]}"

    def step_fn(step: StepInput, pos: int) -> int:
        return sample(stage.forward([step])[0][-1], sampling, pos)

    t0 = time.perf_counter()
    step = StepInput(session, 0, tokens=prompt)
    try:
        for i in range(max_tokens):
            pos = int(prompt.size) + i
            token = await runner.run(step_fn, step, pos)
            now = time.perf_counter()
            if i == 0:
                stats.ttft_s = now - t0
                t_first = now
            else:
                stats.decode_s = now - t_first
            if token in stops:
                stats.finish_reason = "stop"
                return
            stats.generated_tokens = i + 1
            yield token
            step = StepInput(session, pos, tokens=np.array([token], dtype=np.int64))
        stats.finish_reason = "length"
    finally:
        await runner.run(stage.free, session)
