"""The pipeline's real parts — StageHost per node and the Serving side — wired in one
process: each message is encoded with the actors frame codec and decoded again (the
bytes a peer would get), then delivered on a later loop iteration, as a link would.

Used where a test must reach inside a stage: inject wire faults after the digest is
computed, read a stage's KV cache lengths. Each stage has its own ComputeRunner.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

import numpy as np

from actors.codec import FrameDecoder, encode_frame
from kernels.runner import ComputeRunner
from kernels.tokenizer import IncrementalDetokenizer, Tokenizer
from mesh.generation import GenerationParams
from mesh.pipeline.messages import (
    EndSession,
    Forward,
    PlanUpdate,
    Retransmit,
    SessionFailed,
    StageEntry,
    StageReady,
    TokenOut,
)
from mesh.pipeline.serving import PlanView, Serving
from mesh.pipeline.stage_host import SERVE_ACTOR, STAGE_ACTOR, StageHost

SERVE_NODE = "n0"  # the serving node also runs stage 0, as node 0 of a LocalCluster may


def wire_copy(msg: object) -> object:
    """What the receiver decodes from the bytes the sender writes."""
    decoder = FrameDecoder()
    decoder.receive_data(b"".join(bytes(memoryview(p)) for p in encode_frame(msg)))
    return decoder.next_message()


def flip_bit(array: np.ndarray, index: int, bit: int) -> np.ndarray:
    """A copy of ``array`` with one bit of one float32 element flipped."""
    out = np.array(array, dtype=np.float32, copy=True)
    out.reshape(-1).view(np.uint32)[index] ^= np.uint32(1 << bit)
    return out


class InProcessPipeline:
    def __init__(self, model_path: Path, layer_ranges: list[tuple[int, int]]):
        self.model_path = model_path
        self.ranges = layer_ranges
        self.nodes = [f"n{i}" for i in range(len(layer_ranges))]
        self.runners = [ComputeRunner(name=f"stage{i}") for i in range(len(layer_ranges))]
        self.hosts: dict[str, StageHost] = {
            node: StageHost(node, model_path, backend="torch", weight_mode="float32", runner=runner, send=self.send)
            for node, runner in zip(self.nodes, self.runners)}
        self.tokenizer = Tokenizer.from_model(model_path)
        self.serving = Serving(SERVE_NODE, self.send, self._plan_view, eos_ids=list(self.tokenizer.eos_token_ids),
                               tokenizer_factory=lambda: IncrementalDetokenizer(self.tokenizer,
                                                                                skip_special_tokens=True))
        self.sent: list[tuple[str, str, str]] = []  # (to node, actor, message type)
        self.sessions: set[str] = set()  # every session id a message carried
        self.update: PlanUpdate | None = None

    def _plan_view(self) -> PlanView | None:
        if self.update is None:
            return None
        return PlanView(self.update.term, self.update.version, [s.node for s in self.update.stages])

    # -- the network --------------------------------------------------------------------

    def send(self, node: str, actor: str, msg: object) -> None:
        self.sent.append((node, actor, type(msg).__name__))
        if hasattr(msg, "session"):
            self.sessions.add(msg.session)
        asyncio.get_running_loop().call_soon(self._deliver, node, actor, wire_copy(msg))

    def _deliver(self, node: str, actor: str, msg: object) -> None:
        host = self.hosts[node]
        if actor == STAGE_ACTOR:
            handlers: dict[type, Callable] = {Forward: host.on_forward, TokenOut: host.on_token,
                                              EndSession: host.on_end, Retransmit: host.on_retransmit}
            handlers[type(msg)](msg)
            if isinstance(msg, Retransmit) and node == SERVE_NODE:
                self.serving.on_retransmit(msg)  # as Node._on_retransmit does
        elif actor == SERVE_ACTOR:
            {TokenOut: self.serving.on_token, SessionFailed: self.serving.on_failed}[type(msg)](msg)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        stages = [StageEntry(i, node, a, b, "torch") for i, (node, (a, b)) in enumerate(zip(self.nodes, self.ranges))]
        update = PlanUpdate(1, 1, SERVE_NODE, "smollm2-135m", stages)
        readies: list[StageReady] = await asyncio.gather(*(h.apply_plan(update) for h in self.hosts.values()))
        bad = [r for r in readies if not r.ok]
        if bad:
            raise RuntimeError(f"stages failed to load: {bad}")
        for host in self.hosts.values():
            host.start()
        self.update = update

    async def stop(self) -> None:
        for host in self.hosts.values():
            await host.stop()
        for runner in self.runners:
            runner.close()

    # -- helpers for tests -------------------------------------------------------------

    def encode_chat(self, prompt: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def generate(self, prompt: str, **params) -> list[int]:
        ids = []
        async for event in self.serving.generate(self.encode_chat(prompt), GenerationParams(**params)):
            if not event.stop_token:
                ids.append(event.token_id)
        return ids

    async def cache_lens(self) -> dict[str, dict[str, int]]:
        """node -> {session: cached positions > 0} over every session seen on the wire,
        read on each stage's compute thread."""
        out = {}
        sessions = set(self.sessions)
        for node, host in self.hosts.items():
            stage = host.stage
            out[node] = await host.runner.run(lambda: {s: n for s in sessions if (n := stage.cache_len(s)) > 0})
        return out
