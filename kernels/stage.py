"""The backend-neutral Stage interface: a contiguous layer range with a KV cache per session.

A Stage runs layers ``[spec.start, spec.end)`` of a model, plus the token
embedding when ``spec.embed`` and the final norm + lm_head when ``spec.head``.
Everything crossing this boundary is numpy:

- ``StepInput.tokens``: int32/int64 1-D token ids in ``[0, vocab_size)`` (embedding stage only);
- ``StepInput.hidden``: float32 ``(T, hidden)`` of the model's hidden size (every other stage);
- ``forward`` returns, per item, float32 hidden ``(T, hidden)``, or on the head
  stage the logits ``(1, vocab)`` of the last position (``(T, vocab)`` with
  ``all_logits=True``; ``(len(rows), vocab)`` for the step rows an item names in
  ``logit_rows`` — an auditor checking several steps in one pass).

Cache semantics, which every backend must honour (tests/kernels/test_stage_conformance.py):

- an item extends its session's KV cache from ``start_pos``; ``start_pos`` must be
  <= the cached length; a ``start_pos`` below it truncates the cache to
  ``start_pos`` first (replay after failover);
- a session appears at most once per ``forward`` call;
- several 1-token items in one call run as one batched decode step, and give the
  same result as running them one by one (within float tolerance);
- ``free(session)`` drops the cache; ``cache_len`` of an unknown session is 0.

Inputs come from peers, so ``check_items`` validates all of the above (token ids against
the vocabulary, hidden states' dtype and shape) before any backend indexes an embedding
or multiplies a matrix: a bad item raises ``StageInputError``, never an IndexError from
deep inside a backend, and never a silently broadcast tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from kernels.config import ModelConfig

BACKENDS = ("torch", "mlx")
WEIGHT_MODES = ("float32", "quant")
# float32 compute on exactly the values a quant-mode MLX stage holds: what a float32
# auditor of such a stage loads (for the block types MLX requantizes, the file's values differ)
MLX_QUANT_VALUES = "mlx-quant-values"
LOAD_MODES = (*WEIGHT_MODES, MLX_QUANT_VALUES)


class StageInputError(ValueError):
    """A StepInput does not fit the stage (wrong kind of input, bad start_pos, ...)."""


@dataclass(frozen=True)
class StageSpec:
    """Layers ``[start, end)``; ``embed``: owns the token embedding; ``head``: final norm + lm_head."""

    start: int
    end: int
    embed: bool = False
    head: bool = False

    @classmethod
    def full(cls, n_layers: int) -> StageSpec:
        return cls(0, n_layers, embed=True, head=True)

    def layers(self) -> range:
        return range(self.start, self.end)

    def validate(self, config: ModelConfig) -> None:
        if not 0 <= self.start <= self.end <= config.n_layers:
            raise StageInputError(f"layer range [{self.start}, {self.end}) is outside "
                                  f"the model's {config.n_layers} layers")


@dataclass
class StepInput:
    """One session's step: tokens (embedding stage) or hidden states (later stages)."""

    session: str
    start_pos: int
    tokens: np.ndarray | None = None
    hidden: np.ndarray | None = None
    logit_rows: tuple[int, ...] | None = None  # head stage: logits of these rows of the step (default: the last)

    @property
    def length(self) -> int:
        x = self.tokens if self.tokens is not None else self.hidden
        return 0 if x is None else int(x.shape[0])


def output_rows(item: StepInput, all_logits: bool) -> list[int]:
    """The rows of ``item`` whose logits a head stage returns."""
    if item.logit_rows is not None:
        return list(item.logit_rows)
    return list(range(item.length)) if all_logits else [item.length - 1]


class Stage(ABC):
    """A loaded layer range on one backend. Not thread-safe: call from one thread
    (the ComputeRunner's)."""

    spec: StageSpec
    config: ModelConfig
    backend: str
    weight_mode: str

    @abstractmethod
    def forward(self, items: list[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        """Run every item, extending each session's cache; see the module docstring."""

    @abstractmethod
    def free(self, session: str) -> None:
        """Drop the session's KV cache (no error if unknown)."""

    @abstractmethod
    def cache_len(self, session: str) -> int:
        """Number of positions cached for the session (0 if unknown)."""

    @property
    @abstractmethod
    def weights_digest(self) -> bytes:
        """BLAKE3 of the stage's source weight bytes (same on every backend/mode)."""

    @property
    @abstractmethod
    def param_bytes(self) -> int:
        """Bytes of weights this stage holds in memory, as loaded."""

    def check_items(self, items: list[StepInput]) -> None:
        """Shared validation: every backend calls this first."""
        seen = set()
        for it in items:
            if it.session in seen:
                raise StageInputError(f"session {it.session!r} appears twice in one forward call")
            seen.add(it.session)
            if self.spec.embed and it.tokens is None:
                raise StageInputError(f"stage {self.spec} embeds: give tokens, not hidden")
            if not self.spec.embed and it.hidden is None:
                raise StageInputError(f"stage {self.spec} does not embed: give hidden states")
            self._check_tensor(it)
            if it.length == 0:
                raise StageInputError(f"session {it.session!r}: empty step")
            if it.logit_rows is not None and not all(0 <= r < it.length for r in it.logit_rows):
                raise StageInputError(f"session {it.session!r}: logit_rows outside the step's {it.length} rows")
            cached = self.cache_len(it.session)
            if not 0 <= it.start_pos <= cached:
                raise StageInputError(f"session {it.session!r}: start_pos {it.start_pos} is past "
                                      f"the cached length {cached}; replay from <= {cached}")
            if it.start_pos + it.length > self.config.context_length:
                raise StageInputError(f"session {it.session!r}: {it.start_pos + it.length} "
                                      f"positions exceed the context length "
                                      f"{self.config.context_length}")

    def _check_tensor(self, it: StepInput) -> None:
        if it.tokens is not None:
            tokens = it.tokens
            if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or tokens.dtype not in (np.int32, np.int64):
                raise StageInputError(f"session {it.session!r}: tokens must be a 1-D int32/int64 array, got "
                                      f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
                                      f"{getattr(tokens, 'shape', '')}")
            vocab = self.config.vocab_size
            if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
                bad = int(tokens.max()) if int(tokens.max()) >= vocab else int(tokens.min())
                raise StageInputError(f"session {it.session!r}: token id {bad} is outside the "
                                      f"vocabulary [0, {vocab})")
        if it.hidden is not None:
            hidden = it.hidden
            width = self.config.hidden
            if (not isinstance(hidden, np.ndarray) or hidden.dtype != np.float32 or hidden.ndim != 2
                    or hidden.shape[1] != width):
                raise StageInputError(f"session {it.session!r}: hidden states must be float32 (T, {width}), got "
                                      f"{getattr(hidden, 'dtype', type(hidden).__name__)} "
                                      f"{getattr(hidden, 'shape', '')}")
