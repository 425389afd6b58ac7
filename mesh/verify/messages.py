"""Messages of verification. Commitments are signed; everything else is a request,
a reply or a report that carries signed commitments as its evidence."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actors import message
from kernels.sampling import GREEDY
from mesh.pipeline.messages import SamplingParams  # noqa: F811  (registered there as mesh.SamplingParams)


@message("mesh.verify.StepRecord")
@dataclass
class StepRecord:
    """What a stage commits to for one step of one session (a Merkle leaf)."""

    session: str
    step: int
    start_pos: int
    length: int
    input_digest: bytes
    output_digest: bytes
    token: int = -1  # the sampled token (last stage only)
    # past the first stage: the sender's signature on the Forward this step's input came in
    # (commitment.forward_bytes), so the judge can tell who broke a chain link
    input_signature: bytes = b""


@message("mesh.verify.CommitBatch")
@dataclass
class CommitBatch:
    """A stage -> the coordinator: a chunk of step records under one signed Merkle root.

    The signature covers the header (term, version, stage index, layer range, node,
    backend, weight mode, weights digest, upstream key) and the root of the records' leaves.
    ``upstream_key`` is the public key of the node whose signed Forwards these records'
    inputs are (the stage before; empty at the first stage).
    """

    term: int
    version: int
    stage: int
    start: int
    end: int
    node: str
    public_key: bytes
    backend: str
    weight_mode: str
    weights_digest: bytes
    records: list[StepRecord]
    root: bytes
    signature: bytes
    upstream_key: bytes = b""


@message("mesh.verify.AuditWarrant")
@dataclass
class AuditWarrant:
    """The coordinator's signed word that ``auditor`` audits ``node``'s steps of
    ``session`` on stage ``stage`` of plan (term, version): the audited node lets that
    auditor fetch them even when its own member list (from which it computes the
    auditors) lags the coordinator's (mesh/verify/warrant.py)."""

    term: int
    version: int
    session: str
    stage: int
    node: str
    auditor: str
    coordinator_key: bytes
    signature: bytes = b""


@message("mesh.verify.AuditRequest")
@dataclass
class AuditRequest:
    """Coordinator -> an auditor: check ``steps`` of ``session`` as committed by ``batch.node``.

    One request per signed batch and auditor: ``steps`` are the batch's steps selected for
    audit, ``audit_ids`` their audit ids (in the same order). ``records`` are the committed
    records of that stage up to the last of ``steps`` (input digests to check the fetched
    inputs against) that this auditor was not sent before for this session and stage —
    all of them for an escalation. ``round`` is 1 for a first audit, 2 for the escalation.
    """

    audit_ids: list[int]
    round: int
    session: str
    steps: list[int]
    batch: CommitBatch
    records: list[StepRecord]
    n_stages: int
    warrant: AuditWarrant | None = None  # signed by the coordinator; the auditor shows it with its fetch


@message("mesh.verify.AuditFetch")
@dataclass
class AuditFetch:
    """An auditor -> the audited node: the committed inputs of steps >= from_step
    up to ``step``, and the committed outputs of the steps in ``outputs_of`` (default:
    ``step``) — an auditor checks several audited steps of a session in one pass."""

    term: int
    version: int
    session: str
    from_step: int
    step: int
    outputs_of: list[int] = field(default_factory=list)
    warrant: AuditWarrant | None = None  # the coordinator's, from the AuditRequest


@message("mesh.verify.AuditData")
@dataclass
class AuditData:
    ok: bool
    error: str = ""
    steps: list[int] = field(default_factory=list)
    start_pos: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    inputs: np.ndarray | None = None  # every step's input rows, concatenated
    output_steps: list[int] = field(default_factory=list)
    output_lengths: list[int] = field(default_factory=list)
    outputs: np.ndarray | None = None  # the committed outputs of output_steps, concatenated by rows
    sampling: SamplingParams = GREEDY  # how the session samples: the head stage's tokens are re-checked with it


@message("mesh.verify.AuditResult")
@dataclass
class AuditResult:
    """An auditor -> the coordinator (signed by the auditor)."""

    audit_id: int
    round: int
    auditor: str
    node: str
    session: str
    step: int
    ok: bool
    reason: str
    max_row_rel_l2: float
    outside_share: float
    audit_backend: str
    inconclusive: bool = False
    signature: bytes = b""


@message("mesh.verify.AuditReport")
@dataclass
class AuditReport:
    """An auditor -> the coordinator: the results of one pass, each signed on its own
    (a result is the unit of evidence), in one message."""

    results: list[AuditResult]


@message("mesh.verify.WireFault")
@dataclass
class WireFault:
    """A receiver -> the coordinator: bytes from ``sender`` did not hash to the digest it sent."""

    term: int
    version: int
    reporter: str
    sender: str
    session: str
    step: int
    claimed: bytes
    actual: bytes


@message("mesh.verify.NodeFlagged")
@dataclass
class NodeFlagged:
    """Coordinator -> every member: ``node`` is flagged and evicted; ``evidence`` is JSON."""

    term: int
    node: str
    reason: str
    evidence: str


@message("mesh.verify.Summary")
@dataclass
class Summary:
    """Coordinator -> every member: the cluster's verification counters."""

    term: int
    commitments: int
    verified_links: int
    broken_links: int
    audits: int
    audit_failures: int
    audits_pending: int
    strikes: int = 0  # strikes charged to nodes (ledger.py): broken links, missing or malformed commitments
    missing: int = 0  # records owed and not committed by their deadline
