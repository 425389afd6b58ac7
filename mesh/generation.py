"""What a client asks for and what it gets back, independent of where it runs."""

from __future__ import annotations

from dataclasses import dataclass

from kernels.sampling import GREEDY, SamplingParams
from mesh.errors import BadRequest


@dataclass(frozen=True)
class GenerationParams:
    """How long an answer may be, and how its tokens are drawn: `SamplingParams` is the
    one shape sampling takes, from the API to the stage that samples and its auditor."""

    max_tokens: int = 128
    sampling: SamplingParams = GREEDY

    @classmethod
    def create(cls, *, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               seed: int = 0) -> "GenerationParams":
        """From flat fields (API requests, CLI flags); bad values are a `BadRequest`."""
        if temperature < 0:
            raise BadRequest(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise BadRequest(f"top_k must be >= 0, got {top_k}")
        return cls(max_tokens, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))

    def validate(self, *, prompt_len: int, context_length: int) -> None:
        if self.max_tokens <= 0:
            raise BadRequest(f"max_tokens must be positive, got {self.max_tokens}")
        if prompt_len == 0:
            raise BadRequest("the prompt is empty")
        if prompt_len >= context_length:
            raise BadRequest(
                f"the prompt has {prompt_len} tokens but the model's context is {context_length}; shorten it"
            )
        if prompt_len + self.max_tokens > context_length:
            raise BadRequest(
                f"prompt ({prompt_len} tokens) + max_tokens ({self.max_tokens}) exceeds the model's context "
                f"of {context_length} tokens; lower max_tokens to at most {context_length - prompt_len}"
            )


@dataclass
class TokenEvent:
    """One generated token, in order, with the text it completes (may be empty)."""

    index: int
    token_id: int
    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last token
    stop_token: bool = False  # the end-of-sequence token itself: not part of the answer
