"""An honest audit fetch during a membership change (issue 17), on the real verification
services of a coordinator, an audited node and an auditor, with no network.

The audited node decides who may fetch its committed inputs. It used to compute the
auditors itself (`auditor_order` over its own live members), and its list lags the
coordinator's while a node joins: a Mac that just joined is the only other backend, so
the coordinator's first choice for every torch stage, but the audited node has not yet
heard its first heartbeat. The coordinator assigned the audit to it, the audited node
refused the fetch, and that audit failed (two such refusals flag an honest node). Now
the coordinator signs a warrant for the auditor it picked; the audited node accepts the
fetch from exactly that auditor, and still refuses everyone else."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from actors.identity import NodeIdentity
from kernels.digest import tensor_digest
from mesh import binding
from mesh.pipeline.coordinator import CoordinatorRole, PlanRecord
from mesh.pipeline.messages import Forward, PlanUpdate, StageEntry
from mesh.planner import ModelProfile
from mesh.verify.auditor import fetch_of
from mesh.verify.messages import AuditFetch, AuditRequest, CommitBatch
from mesh.verify.service import VerifyConfig, VerifyService
from mesh.verify.warrant import sign_warrant
from mesh.verify.worker import InlineAuditCompute

PROFILE = ModelProfile(n_layers=30, layer_bytes=1, embed_bytes=1, head_bytes=1)
TERM, VERSION = 3, 7


class Sent(list):
    def __call__(self, node: str, actor: str, msg: object) -> bool:
        self.append((node, msg))
        return True

    def of(self, kind: type) -> list[tuple[str, object]]:
        return [(n, m) for n, m in self if isinstance(m, kind)]


def service(identity: NodeIdentity, members: dict[str, str], coordinator: str, sent: Sent,
            role: CoordinatorRole | None = None) -> VerifyService:
    role = role or CoordinatorRole(identity.node_id, "m", PROFILE, sent)
    return VerifyService(identity, Path("unused.gguf"), backend="torch", weight_mode="float32", send=sent,
                         ask=None, coordinator=lambda: coordinator, members=lambda: dict(members), role=role,
                         stage_idle_s=lambda: 0.0, config=VerifyConfig(audit_rate=1.0, audit_seed="h17b"),
                         audit_compute=InlineAuditCompute())


class World:
    """A coordinator, the node holding stage 0, two torch members it knows, and a Mac
    that only the coordinator has heard of yet."""

    def __init__(self) -> None:
        self.coord_id, self.producer_id = NodeIdentity.generate(), NodeIdentity.generate()
        coord, producer = self.coord_id.node_id, self.producer_id.node_id
        self.mac = "mac-that-just-joined"
        known = {coord: "torch", producer: "torch", "laptop": "torch", "desktop": "torch"}
        self.plan = PlanUpdate(TERM, VERSION, coord, "m", [StageEntry(0, producer, 0, 30, "torch")])
        role = CoordinatorRole(coord, "m", PROFILE, lambda *a: None)
        role.active, role.term, role.current = True, TERM, PlanRecord(self.plan, 0.0)
        self.coord_sent, self.producer_sent = Sent(), Sent()
        self.coordinator = service(self.coord_id, {**known, self.mac: "mlx"}, coord, self.coord_sent, role)
        self.producer = service(self.producer_id, known, coord, self.producer_sent)  # the Mac: not yet here
        rec = self.producer.recorder
        rec.entry, rec.stage = self.plan.stages[0], SimpleNamespace(weights_digest=b"w" * 32)
        tokens = np.array([5, 6, 7], dtype=np.int32)
        rec.on_sent(Forward(TERM, VERSION, "s", 0, 0, "serve", tensor_digest(tokens), tokens=tokens),
                    np.zeros((3, 4), np.float32), b"d" * 32)

    def assign(self) -> tuple[str, AuditRequest]:
        """The producer's commitment reaches the coordinator, which assigns its audit."""
        ((to, batch),) = self.producer_sent.of(CommitBatch)
        assert to == self.coord_id.node_id
        self.coordinator._on_batch(batch)
        ((auditor, req),) = self.coord_sent.of(AuditRequest)
        return auditor, req

    def refusal(self, fetch: AuditFetch, peer: str) -> str | None:
        """What the producer's link check (`Node._bound`) says of ``fetch`` from ``peer``."""
        view = binding.View(self.producer_id.node_id, TERM, self.coord_id.node_id, self.plan,
                            fetchers=lambda f: self.producer.fetchers(f, peer))
        return binding.refusal(fetch, peer, view)


async def test_an_honest_auditor_the_audited_node_has_not_heard_of_yet_may_fetch():
    w = World()
    auditor, req = w.assign()
    assert auditor == w.mac  # the other backend: everyone's first choice
    fetch = fetch_of(req, 0, req.steps)
    assert w.refusal(fetch, w.mac) is None, "the honest auditor's fetch was refused"
    assert w.producer.recorder.fetch(fetch).ok


async def test_the_escalation_auditor_may_fetch_too():
    w = World()
    _, req = w.assign()
    second = dataclasses.replace(req, round=2, warrant=sign_warrant(w.coord_id, req, "laptop"))
    assert w.refusal(fetch_of(second, 0, req.steps), "laptop") is None


@pytest.mark.parametrize("forgery", ["none", "other_auditor", "not_the_coordinator", "other_session", "bad_signature"])
async def test_anyone_else_is_still_refused(forgery):
    """A warrant covers its auditor, session, stage and plan, signed by the coordinator
    this node follows; anything else falls back to the node's own list, which the rogue
    (a member that is no auditor of that stage) is not on."""
    w = World()
    _, req = w.assign()
    members = {w.producer_id.node_id: "torch", "laptop": "torch", "desktop": "torch", "a": "torch", "b": "torch"}
    w.producer.members = lambda: dict(members)
    own = w.producer._auditors(0, w.producer_id.node_id, "torch", members)
    rogue = next(n for n in sorted(members) if n not in own and n != w.producer_id.node_id)  # a member, no auditor
    warrant = {
        "none": None,
        "other_auditor": sign_warrant(w.coord_id, req, w.mac),
        "not_the_coordinator": sign_warrant(NodeIdentity.generate(), req, rogue),
        "other_session": sign_warrant(w.coord_id, dataclasses.replace(req, session="another"), rogue),
        "bad_signature": dataclasses.replace(sign_warrant(w.coord_id, req, rogue), signature=b"\0" * 64),
    }[forgery]
    fetch = dataclasses.replace(fetch_of(req, 0, req.steps), warrant=warrant)
    assert w.refusal(fetch, rogue), forgery


async def test_the_warrant_travels_with_the_request_and_the_fetch():
    from actors import codec

    w = World()
    _, req = w.assign()
    fetch = fetch_of(req, 0, req.steps)
    for msg in (req, fetch, dataclasses.replace(fetch, warrant=None)):
        parts = codec.encode(msg)
        assert codec.decode(parts[0], parts[1:]) == msg
