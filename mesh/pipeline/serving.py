"""The serving side of a session: the node that took the client's request.

It owns the session's truth — the prompt and every token streamed so far — so when
the pipeline changes (a stage or the coordinator died, a node joined), it replays
the session on the new plan from exactly what it holds: the client's stream goes on
with no lost and no repeated token.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import numpy as np
import structlog

from actors.clock import LOOP_CLOCK, Clock
from kernels.digest import tensor_digest
from kernels.tokenizer import IncrementalDetokenizer
from mesh.errors import MeshError
from mesh.generation import GenerationParams, TokenEvent
from mesh.pipeline.messages import EndSession, Forward, Retransmit, SessionFailed, SessionMeta, StepLost, TokenOut
from mesh.pipeline.plan import NO_EPOCH, Epoch, PlanView
from mesh.pipeline.sequencer import TokenSequencer, Verdict

log = structlog.get_logger("mesh.serve")

Send = Callable[[str, str, object], bool | None]  # False: the message was dropped


class SessionError(MeshError):
    """The pipeline refused or lost the session; the message says why."""


@dataclass
class _Session:
    id: str
    prompt_ids: list[int]
    params: GenerationParams
    meta: SessionMeta
    events: asyncio.Queue
    last_progress: float
    sequencer: TokenSequencer = field(default_factory=TokenSequencer)
    epoch: Epoch = NO_EPOCH  # the plan the session was last sent into
    last_forward: Forward | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    links_lost_mark: int = 0  # Serving.links_lost when the session last made progress
    replays: int = 0
    done: bool = False
    stage_nodes: set[str] = field(default_factory=set)  # every node any of its plans sent it to


class Serving:
    """Sessions this node serves. ``plan`` returns the ready plan or None."""

    def __init__(self, node_id: str, send: Send, plan: Callable[[], PlanView | None], *,
                 eos_ids: list[int], tokenizer_factory: Callable[[], IncrementalDetokenizer],
                 stall_s: float = 5.0, stall_s_per_token: float = 0.01, clock: Clock = LOOP_CLOCK,
                 session_ids: Callable[[], str] = lambda: uuid.uuid4().hex):
        self.node_id = node_id
        self.clock = clock
        self.session_ids = session_ids  # seeded in deterministic meshes: which steps are audited hangs on it
        self.send = send
        self.plan = plan
        self.eos_ids = list(eos_ids)
        self.detok_factory = tokenizer_factory
        self.sessions: dict[str, _Session] = {}
        self.completed = 0
        self.tokens_out = 0
        self.stall_s = stall_s
        self.stall_s_per_token = stall_s_per_token
        self.stalls = 0
        self.links_lost = 0  # connections to peers that dropped: the only way a message is lost

    # -- client side --------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[TokenEvent]:
        """Run one session; yield its tokens in order. Closing the iterator cancels it."""
        session = _Session(
            id=self.session_ids(),
            prompt_ids=list(prompt_ids),
            params=params,
            meta=SessionMeta(serve_node=self.node_id, prompt_len=len(prompt_ids), max_tokens=params.max_tokens,
                             sampling=params.sampling, eos_ids=self.eos_ids),
            events=asyncio.Queue(),
            last_progress=self.clock.now(),
        )
        self.sessions[session.id] = session
        detok = self.detok_factory()
        try:
            self._submit(session)
            index = 0
            while True:
                item = await session.events.get()
                if isinstance(item, Exception):
                    raise item
                token, finish = item
                if session.first_token_at is None:
                    session.first_token_at = time.perf_counter()
                stop_token = finish == "stop"  # the eos token ends the answer (kernels.sampling.finish_reason)
                text = "" if stop_token else detok.feed(token)
                if finish is not None:
                    text += detok.flush()
                yield TokenEvent(index=index, token_id=token, text=text, finish_reason=finish, stop_token=stop_token)
                index += 1
                if finish is not None:
                    return
        finally:
            session.done = True
            self.sessions.pop(session.id, None)
            self.completed += 1
            # every stage that may hold its KV: those of each plan it was sent into, and the
            # current plan's (also when it ends while no plan is ready, mid-failover)
            plan = self.plan()
            nodes = session.stage_nodes | (set(plan.stage_nodes) if plan is not None else set())
            for node in sorted(nodes):
                self.send(node, "stage", EndSession(session.id))

    # -- pipeline side ------------------------------------------------------------------

    def _submit(self, session: _Session) -> None:
        """Send the session (prompt + tokens so far) into the pipeline's first stage."""
        plan = self.plan()
        if plan is None:
            return  # replayed when a plan becomes ready
        ids = np.asarray(session.prompt_ids + session.sequencer.tokens, dtype=np.int32)
        session.epoch = plan.epoch
        session.stage_nodes.update(plan.stage_nodes)
        session.last_progress = self.clock.now()
        session.links_lost_mark = self.links_lost
        fwd = Forward(plan.epoch.term, plan.epoch.version, session.id, step=session.sequencer.next_seq, start_pos=0,
                      sender=self.node_id, digest=tensor_digest(ids), tokens=ids, meta=session.meta)
        session.last_forward = fwd
        if self.send(plan.stage_nodes[0], "stage", fwd) is False:
            session.links_lost_mark = -1  # dropped: check_stalls replays it

    def on_plan_ready(self) -> None:
        """A new plan is serving: replay every session that is not on it yet."""
        plan = self.plan()
        if plan is None:
            return
        for session in list(self.sessions.values()):
            if session.epoch != plan.epoch and not session.done:
                session.replays += 1
                log.info("session.replay", session=session.id, tokens=session.sequencer.next_seq,
                         epoch=str(plan.epoch))
                self._submit(session)

    def on_token(self, msg: TokenOut) -> None:
        session = self.sessions.get(msg.session)
        if session is None or session.done:
            return
        verdict = session.sequencer.offer(msg.seq, msg.token)
        if verdict is Verdict.ACCEPTED:
            self.tokens_out += 1
            session.last_progress = self.clock.now()
            session.links_lost_mark = self.links_lost
            session.events.put_nowait((msg.token, msg.finish_reason))
            if msg.finish_reason:
                session.done = True
        elif verdict is Verdict.GAP:
            log.warning("session.token_gap", session=msg.session, seq=msg.seq, expected=session.sequencer.next_seq)
            self._submit(session)  # replay from what we hold

    def on_step_lost(self, msg: StepLost) -> None:
        """A stage could not pass one of this session's steps on: something was lost, so
        `check_stalls` may replay the session once it has stalled."""
        session = self.sessions.get(msg.session)
        if session is not None and not session.done and Epoch.of(msg) == session.epoch:
            session.links_lost_mark = -1

    def on_failed(self, msg: SessionFailed) -> None:
        session = self.sessions.get(msg.session)
        if session is not None and not session.done:
            session.events.put_nowait(SessionError(msg.error))

    def on_retransmit(self, msg: Retransmit, peer: str | None = None) -> None:
        """``peer`` (None: this node) asks for the session's last Forward again: only the
        head, where it went, may."""
        session = self.sessions.get(msg.session)
        if session is None or session.last_forward is None or session.last_forward.step != msg.step:
            return
        plan = self.plan()
        if plan is not None and session.epoch == plan.epoch and (peer or self.node_id) == plan.stage_nodes[0]:
            self.send(plan.stage_nodes[0], "stage", session.last_forward)

    def check_stalls(self, now: float | None = None) -> int:
        """Replay sessions that made no progress for too long on a ready plan after a
        connection dropped: a message lost with it would otherwise stall them forever.
        A session that is only slow (a loaded machine) is left alone. Replays are safe:
        tokens are deterministic and the sequencer drops duplicates."""
        plan = self.plan()
        if plan is None:
            return 0
        now = self.clock.now() if now is None else now
        replayed = 0
        for session in list(self.sessions.values()):
            if session.done or session.epoch != plan.epoch:
                continue
            if session.links_lost_mark == self.links_lost:
                continue  # nothing can have been lost: it is only slow
            length = len(session.prompt_ids) + session.sequencer.next_seq
            # Back off per replay: on a loaded machine a step can outlast the timeout, and
            # replaying every few seconds would only add prefills to the queue it waits in.
            backoff = 2 ** min(session.replays, 6)
            if now - session.last_progress > (self.stall_s + self.stall_s_per_token * length) * backoff:
                self.stalls += 1
                session.replays += 1
                replayed += 1
                log.warning("session.stalled", session=session.id, tokens=session.sequencer.next_seq,
                            idle_s=round(now - session.last_progress, 2))
                self._submit(session)
        return replayed

    def fail_all(self, error: Exception) -> None:
        for session in self.sessions.values():
            if not session.done:
                session.events.put_nowait(error)
