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
from kernels.sampling import GREEDY, SamplingParams, finish_reason, sample
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


class _Run:
    """One generation's state; the sync and async loops differ only in where ``compute`` runs."""

    def __init__(self, stage: Stage, prompt_ids: Iterable[int], max_tokens: int, sampling: SamplingParams,
                 stop_ids: Iterable[int] | None, stats: GenerationStats | None, session: str | None):
        prompt, self.stops = _setup(stage, prompt_ids, stop_ids)
        self.stage, self.sampling, self.max_tokens = stage, sampling, max_tokens
        self.stats = stats if stats is not None else GenerationStats()
        self.stats.prompt_tokens = int(prompt.size)
        self.session = session or f"gen-{uuid.uuid4().hex[:8]}"
        self.step = StepInput(self.session, 0, tokens=prompt)
        self.pos = int(prompt.size)  # the position of the token being sampled
        self.generated = 0
        self.done = max_tokens <= 0
        self.t0 = time.perf_counter()
        self.t_first = self.t0

    def compute(self) -> int:
        """Forward pass and sampling of the next token (on whichever thread runs compute)."""
        return sample(self.stage.forward([self.step])[0][-1], self.sampling, self.pos)

    def take(self, token: int) -> bool:
        """Record ``token``; True if it is part of the answer (not a stop id)."""
        now = time.perf_counter()
        if self.generated == 0 and self.stats.ttft_s == 0.0:
            self.stats.ttft_s, self.t_first = now - self.t0, now
        else:
            self.stats.decode_s = now - self.t_first
        finish = finish_reason(token, self.generated, max_tokens=self.max_tokens, eos_ids=self.stops)
        if finish is not None:
            self.stats.finish_reason, self.done = finish, True
        if finish == "stop":
            return False
        self.generated += 1
        self.stats.generated_tokens = self.generated
        self.step = StepInput(self.session, self.pos, tokens=np.array([token], dtype=np.int64))
        self.pos += 1
        return True


def generate(stage: Stage, prompt_ids: Iterable[int], *, max_tokens: int = 256,
             sampling: SamplingParams = GREEDY, stop_ids: Iterable[int] | None = None,
             stats: GenerationStats | None = None, session: str | None = None) -> Iterator[int]:
    """Yield generated token ids; stops before yielding a stop id (default: the
    model's eos ids) or after ``max_tokens``. The session's cache is freed at the end."""
    run = _Run(stage, prompt_ids, max_tokens, sampling, stop_ids, stats, session)
    try:
        while not run.done:
            token = run.compute()
            if run.take(token):
                yield token
    finally:
        stage.free(run.session)


async def agenerate(stage: Stage, prompt_ids: Iterable[int], runner: ComputeRunner, *,
                    max_tokens: int = 256, sampling: SamplingParams = GREEDY,
                    stop_ids: Iterable[int] | None = None, stats: GenerationStats | None = None,
                    session: str | None = None) -> AsyncIterator[int]:
    """``generate`` with every step (forward + sampling) on the runner's compute thread."""
    run = _Run(stage, prompt_ids, max_tokens, sampling, stop_ids, stats, session)
    try:
        while not run.done:
            token = await runner.run(run.compute)
            if run.take(token):
                yield token
    finally:
        await runner.run(stage.free, run.session)
