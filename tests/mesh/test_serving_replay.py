"""The serving side on its own: replay on a new plan, stall recovery, duplicates."""

from __future__ import annotations

import asyncio

from actors.clock import ManualClock
from mesh.generation import GenerationParams
from mesh.pipeline.messages import Forward, Retransmit, TokenOut
from mesh.pipeline.plan import Epoch, PlanView
from mesh.pipeline.serving import Serving


class _Detok:
    def feed(self, token: int) -> str:
        return f"<{token}>"

    def flush(self) -> str:
        return ""


def _serving(plan: list[PlanView | None], clock: ManualClock) -> tuple[Serving, list]:
    sent: list = []
    serving = Serving("serve", lambda node, actor, msg: sent.append((node, actor, msg)), lambda: plan[0],
                      eos_ids=[2], tokenizer_factory=_Detok, stall_s=1.0, stall_s_per_token=0.0, clock=clock)
    return serving, sent


async def test_a_stalled_session_is_replayed_from_what_it_holds():
    plan = [PlanView(Epoch(1, 1), ["a", "b"])]
    clock = ManualClock()
    serving, sent = _serving(plan, clock)
    stream = serving.generate([5, 6, 7], GenerationParams.create(max_tokens=4))
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    (node, _, fwd), = sent
    assert node == "a" and isinstance(fwd, Forward) and list(fwd.tokens) == [5, 6, 7]
    serving.on_token(TokenOut(1, 1, fwd.session, 0, 42))
    assert (await first).token_id == 42
    assert serving.check_stalls() == 0  # it just made progress
    clock.advance(2.0)
    assert serving.check_stalls() == 0  # slow, but nothing can have been lost
    serving.links_lost += 1  # a connection dropped: a message may have gone with it
    clock.advance(0.5)
    assert serving.check_stalls() == 1  # idle for 2.5 s since its last progress: replay
    assert serving.check_stalls() == 0  # and not again at once (it backs off)
    replay = sent[-1][2]
    assert list(replay.tokens) == [5, 6, 7, 42] and replay.start_pos == 0 and replay.step == 1
    serving.on_token(TokenOut(1, 1, fwd.session, 0, 42))  # the old pipeline's duplicate: dropped
    serving.on_token(TokenOut(1, 1, fwd.session, 1, 43, "length"))
    event = await stream.__anext__()
    assert (event.token_id, event.finish_reason) == (43, "length")
    await stream.aclose()


async def test_sessions_wait_for_a_plan_and_replay_when_it_is_ready():
    plan: list[PlanView | None] = [None]
    clock = ManualClock()
    serving, sent = _serving(plan, clock)
    stream = serving.generate([9], GenerationParams.create(max_tokens=2))
    pending = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    clock.advance(10.0)
    assert sent == [] and serving.check_stalls() == 0  # no plan: nothing to replay on
    plan[0] = PlanView(Epoch(2, 5), ["c"])
    serving.on_plan_ready()
    (node, _, fwd), = sent
    assert node == "c" and (fwd.term, fwd.version) == (2, 5)
    serving.on_token(TokenOut(2, 5, fwd.session, 0, 2, "stop"))
    event = await pending
    assert event.stop_token and event.text == ""
    await stream.aclose()


async def test_a_session_that_ends_mid_failover_still_releases_every_stage_that_held_it():
    plan: list[PlanView | None] = [PlanView(Epoch(1, 1), ["a", "b"])]
    clock = ManualClock()
    serving, sent = _serving(plan, clock)
    stream = serving.generate([5, 6], GenerationParams.create(max_tokens=8))
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    fwd = sent[0][2]
    serving.on_token(TokenOut(1, 1, fwd.session, 0, 42))
    assert (await first).token_id == 42
    plan[0] = PlanView(Epoch(2, 1), ["c", "b"])  # failover: a is replaced by c
    serving.on_plan_ready()
    plan[0] = None  # and then the plan is lost again before the client goes away
    sent.clear()
    await stream.aclose()
    ends = sorted(node for node, actor, msg in sent if type(msg).__name__ == "EndSession")
    assert ends == ["a", "b", "c"]  # a may still hold its KV from the first plan
    assert all(msg.session == fwd.session for _, _, msg in sent)


async def test_only_the_head_makes_the_serving_node_resend_a_prompt():
    plan = [PlanView(Epoch(1, 1), ["a", "b"])]
    serving, sent = _serving(plan, ManualClock())
    stream = serving.generate([5, 6, 7], GenerationParams.create(max_tokens=4))
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    (_, _, fwd), = sent
    serving.on_retransmit(Retransmit(1, 1, fwd.session, 0, "forged"), "b")  # a stage, but not where it went
    assert len(sent) == 1
    serving.on_retransmit(Retransmit(1, 1, fwd.session, 0, "digest mismatch"), "a")
    assert sent[-1] == ("a", "stage", fwd)
    serving.on_token(TokenOut(1, 1, fwd.session, 0, 42, "length"))
    assert (await first).finish_reason == "length"
    await stream.aclose()
