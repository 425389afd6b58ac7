"""The single-device reference every mesh test compares with, and the shared prompts.

`Reference` computes in this process with kernels, once per test session: the tokens
`mesh generate --json` gives (same chat template encoding as a node, the tokenizer's
eos ids as stop ids).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

MAX_TOKENS = 48
SEED = 1234
TEMPERATURE = 0.8
# Short chat prompts with varied answers: some stop early on eos, most run to 48 tokens.
PROMPTS = [
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "Explain recursion to a child.",
    "Why is the sky blue?",
    "Give me a short story about a robot.",
    "Name the planets of the solar system.",
    "What is the difference between a virus and a bacterium?",
    "Describe a sunrise over the mountains.",
]
MODES = {"greedy": 0.0, "sampled": TEMPERATURE}


@dataclass(frozen=True)
class Request:
    prompt: str
    temperature: float
    seed: int = SEED
    max_tokens: int = MAX_TOKENS


class Reference:
    """Single-device torch generation in this process: the tokens `mesh generate --json`
    gives (same chat template encoding as a node, the tokenizer's eos ids as stop ids).

    The model loads on first use; results are memoized, so every test that compares
    with the same request pays for it once. A lock keeps the stage single-threaded.
    """

    def __init__(self, model_path: Path, backend: str = "torch"):
        self.model_path = model_path
        self.backend = backend
        self._stage = None
        self._tokenizer = None
        self._lock = threading.Lock()
        self._memo: dict[Request, list[int]] = {}

    def _load(self) -> None:
        from kernels.config import load_config
        from kernels.loader import load_stage
        from kernels.stage import StageSpec
        from kernels.tokenizer import Tokenizer

        config = load_config(self.model_path)
        self._tokenizer = Tokenizer.from_model(self.model_path)
        self._stage = load_stage(self.model_path, StageSpec.full(config.n_layers), backend=self.backend)

    def encode(self, prompt: str) -> list[int]:
        with self._lock:
            if self._stage is None:
                self._load()
        tok = self._tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)

    def tokens(self, req: Request) -> list[int]:
        from kernels.generate import generate
        from kernels.sampling import SamplingParams

        ids = self.encode(req.prompt)
        with self._lock:
            if req not in self._memo:
                sampling = SamplingParams(temperature=req.temperature, seed=req.seed)
                self._memo[req] = list(generate(self._stage, ids, max_tokens=req.max_tokens, sampling=sampling,
                                                stop_ids=self._tokenizer.eos_token_ids))
            return self._memo[req]

    def warm(self, requests: list[Request]) -> threading.Thread:
        """Compute ``requests`` in a background thread (overlaps a cluster's start-up)."""
        thread = threading.Thread(target=lambda: [self.tokens(r) for r in requests], daemon=True)
        thread.start()
        return thread
