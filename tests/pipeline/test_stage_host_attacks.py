"""Attacks on a stage by one bad step (issue 17).

One Forward with a token id >= the vocabulary size used to kill the stage's batching task
(`StageHost._run` had no exception handling): every later request hung. Now the bad step
fails its own session with a `SessionFailed` that says why, and the loop and every other
session keep going. The same for hidden states of the wrong dtype or width.

A real StageHost on a tiny synthetic GGUF (torch, float32), with an injected `send`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kernels.digest import tensor_digest
from kernels.runner import ComputeRunner
from kernels.sampling import SamplingParams
from mesh.pipeline.messages import Forward, PlanUpdate, SessionFailed, SessionMeta, StageEntry, TokenOut
from mesh.pipeline.stage_host import StageHost
from tests.kernels.synthetic import TINY, write_tiny_gguf
from waiting import until

pytest.importorskip("torch")

SPEC = TINY["mistral"]
ME, SERVE = "stage-node", "serve-node"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "model.gguf", SPEC)


class Sent:
    def __init__(self) -> None:
        self.messages: list[tuple[str, str, object]] = []

    def __call__(self, node: str, actor: str, msg: object) -> bool:
        self.messages.append((node, actor, msg))
        return True

    def of(self, kind: type, session: str) -> list:
        return [m for _, _, m in self.messages if isinstance(m, kind) and m.session == session]


async def host_for(model: Path, stages: list[StageEntry], runner: ComputeRunner, sent: Sent) -> StageHost:
    host = StageHost(ME, model, backend="torch", weight_mode="float32", runner=runner, send=sent)
    ready = await host.apply_plan(PlanUpdate(1, 1, "coord", "tiny", stages))
    assert ready.ok, ready.error
    host.start()
    return host


def prefill(session: str, tokens: np.ndarray, max_tokens: int = 2) -> Forward:
    meta = SessionMeta(SERVE, prompt_len=len(tokens), max_tokens=max_tokens, sampling=SamplingParams())
    return Forward(1, 1, session, 0, 0, "client", tensor_digest(tokens), tokens=tokens, meta=meta)


def hidden_step(session: str, hidden: np.ndarray) -> Forward:
    meta = SessionMeta(SERVE, prompt_len=hidden.shape[0], max_tokens=1, sampling=SamplingParams())
    return Forward(1, 1, session, 0, 0, "prev", tensor_digest(hidden), hidden=hidden, meta=meta)


def finished(sent: Sent, session: str) -> bool:
    return any(t.finish_reason for t in sent.of(TokenOut, session))


async def test_token_id_past_the_vocabulary_fails_only_its_session(model: Path) -> None:
    sent = Sent()
    with ComputeRunner() as runner:
        host = await host_for(model, [StageEntry(0, ME, 0, SPEC.n_layers, "torch")], runner, sent)
        try:
            good = np.array([1, 2, 3], dtype=np.int32)
            # In one batch: an honest prefill beside the attack; then a request after it.
            host.on_forward(prefill("honest", good))
            host.on_forward(prefill("attack", np.array([1, SPEC.vocab], dtype=np.int32)))
            await until(lambda: sent.of(SessionFailed, "attack"), 30, "the attack's session to fail")
            (failure,) = sent.of(SessionFailed, "attack")
            assert "token id" in failure.error and "vocabulary" in failure.error
            assert host._task is not None and not host._task.done()
            host.on_forward(prefill("later", good))
            await until(lambda: finished(sent, "honest") and finished(sent, "later"), 30,
                        "the other sessions to complete")
            assert not sent.of(SessionFailed, "honest") and not sent.of(SessionFailed, "later")
            assert sent.of(TokenOut, "honest")[0].token == sent.of(TokenOut, "later")[0].token
            host.on_forward(prefill("negative", np.array([-1], dtype=np.int64)))
            await until(lambda: sent.of(SessionFailed, "negative"), 30, "a negative token id refused")
        finally:
            await host.stop()


@pytest.mark.parametrize("bad", [
    np.zeros((2, SPEC.hidden), np.float64),
    np.zeros((2, SPEC.hidden + 1), np.float32),
    np.zeros((SPEC.hidden,), np.float32),
    np.zeros((2, SPEC.hidden, 1), np.float32),
], ids=["float64", "too-wide", "1-d", "3-d"])
async def test_hidden_states_of_the_wrong_shape_or_dtype_fail_only_their_session(model: Path,
                                                                                 bad: np.ndarray) -> None:
    sent = Sent()
    stages = [StageEntry(0, "first", 0, 1, "torch"), StageEntry(1, ME, 1, SPEC.n_layers, "torch")]
    with ComputeRunner() as runner:
        host = await host_for(model, stages, runner, sent)
        try:
            host.on_forward(hidden_step("attack", bad))
            host.on_forward(hidden_step("honest", np.full((2, SPEC.hidden), 0.1, np.float32)))
            await until(lambda: sent.of(SessionFailed, "attack") and sent.of(TokenOut, "honest"), 30,
                        "the attack refused and the honest step computed")
            assert "float32" in sent.of(SessionFailed, "attack")[0].error
            assert not sent.of(SessionFailed, "honest")
        finally:
            await host.stop()


async def test_a_backend_error_fails_the_batch_and_the_loop_keeps_running(model: Path) -> None:
    sent = Sent()
    with ComputeRunner() as runner:
        host = await host_for(model, [StageEntry(0, ME, 0, SPEC.n_layers, "torch")], runner, sent)
        try:
            real_emit = host._sample_and_emit
            calls = 0

            async def broken_once(results):  # a failure past the forward pass, once
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise RuntimeError("boom")
                await real_emit(results)

            host._sample_and_emit = broken_once  # type: ignore[method-assign]
            host.on_forward(prefill("first", np.array([1, 2], dtype=np.int32)))
            await until(lambda: sent.of(SessionFailed, "first"), 30, "the broken batch's session to fail")
            assert "boom" in sent.of(SessionFailed, "first")[0].error
            host.on_forward(prefill("second", np.array([1, 2], dtype=np.int32)))
            await until(lambda: finished(sent, "second"), 30, "a later session to complete")
        finally:
            await host.stop()
