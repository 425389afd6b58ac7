"""Audit warrants: the coordinator signs which auditor may fetch which steps (sans-IO).

The audited node used to decide who may fetch its committed inputs by computing the
auditors itself (`auditor_order` over its own live members). During a membership
change its member list lags or leads the coordinator's: a node that just joined (and
is, say, the only other backend, so everyone's first choice) is not yet live here, or
a node that just died still is, and the honest auditor the coordinator picked was
refused. A refused fetch fails that audit, and two refused in a row flag an honest node.

So the coordinator signs each assignment with its node key (`sign_warrant`), the
auditor shows it with its fetch, and the audited node accepts the fetch from exactly
the auditor the warrant names, for that session, stage and plan, if the warrant is
signed by the coordinator it follows now (`warrant_refusal`). Without a valid warrant
it falls back to its own computation, as before. This gives the coordinator no new
power: it already chooses who holds every stage, the prompt's too.
"""

from __future__ import annotations

from actors.identity import NodeIdentity, node_id_of
from mesh.verify.commitment import signed_fields
from mesh.verify.messages import AuditFetch, AuditRequest, AuditWarrant


def warrant_bytes(w: AuditWarrant) -> bytes:
    """What the coordinator signs."""
    return signed_fields(b"mesh audit warrant", w.term, w.version, w.session, w.stage, w.node, w.auditor,
                   w.coordinator_key)


def sign_warrant(identity: NodeIdentity, req: AuditRequest, auditor: str) -> AuditWarrant:
    """The coordinator's warrant for ``auditor`` to carry out ``req``."""
    b = req.batch
    w = AuditWarrant(b.term, b.version, req.session, b.stage, b.node, auditor, identity.public_key)
    w.signature = identity.sign(warrant_bytes(w))
    return w


def warrant_refusal(fetch: AuditFetch, peer: str, me: str, stage: int, coordinator: str | None) -> str | None:
    """Why ``fetch`` from ``peer`` is not covered by its warrant (None: it is), at node ``me``
    that committed the fetched steps as stage ``stage`` and follows ``coordinator``."""
    w = fetch.warrant
    if w is None:
        return "no warrant"
    if coordinator is None or node_id_of(w.coordinator_key) != coordinator:
        return f"warrant not signed by the coordinator ({coordinator})"
    if (w.auditor, w.node, w.session, w.stage, w.term, w.version) != (
            peer, me, fetch.session, stage, fetch.term, fetch.version):
        return "warrant for another auditor, node, session, stage or plan"
    if not NodeIdentity.verify(w.coordinator_key, warrant_bytes(w), w.signature):
        return "warrant with a bad signature"
    return None
