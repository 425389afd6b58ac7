"""Messages of the inference pipeline. Every one carries the plan epoch it belongs
to — (coordinator term, plan version), `mesh.pipeline.plan.Epoch` — so a receiver
drops what an older plan sent."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from actors import message
from kernels.sampling import SamplingParams

# The sampling parameters travel as they are: one shape from the API to the auditor.
message("mesh.SamplingParams")(SamplingParams)


@message("mesh.StageEntry")
@dataclass
class StageEntry:
    index: int
    node: str
    start: int
    end: int
    backend: str


@message("mesh.PlanUpdate")
@dataclass
class PlanUpdate:
    """Coordinator -> every member: the layer map every node follows from now on."""

    term: int
    version: int
    coordinator: str
    model: str
    stages: list[StageEntry]
    error: str = ""  # set, with no stages, when the survivors cannot hold the model
    failovers: list[dict] = field(default_factory=list)  # the latest failovers, newest last


@message("mesh.StageReady")
@dataclass
class StageReady:
    """A node -> the coordinator: its layers of that plan are loaded (or failed to)."""

    term: int
    version: int
    node: str
    ok: bool
    error: str = ""
    load_s: float = 0.0


@message("mesh.PlanReady")
@dataclass
class PlanReady:
    """Coordinator -> every member: every stage of the plan is loaded; serve on it."""

    term: int
    version: int


@message("mesh.SessionMeta")
@dataclass
class SessionMeta:
    """What every stage keeps about a session (the last stage samples with it)."""

    serve_node: str
    prompt_len: int
    max_tokens: int
    sampling: SamplingParams
    eos_ids: list[int] = field(default_factory=list)


@message("mesh.Forward")
@dataclass
class Forward:
    """One step of one session into a stage: token ids (stage 0) or hidden states.

    ``digest`` is BLAKE3 of the exact tensor bytes as the sender computed them; the
    receiver checks it before using the tensor. ``meta`` travels with prefills only.
    Between stages (with verification on), ``signature`` is the sender's Ed25519
    signature over (term, version, session, step, start_pos, sender, digest) and
    ``public_key`` its key: the receiver commits to it, so a sender cannot later deny
    what it sent (mesh/verify/commitment.py, ``forward_bytes``).
    """

    term: int
    version: int
    session: str
    step: int
    start_pos: int
    sender: str
    digest: bytes
    tokens: np.ndarray | None = None
    hidden: np.ndarray | None = None
    meta: SessionMeta | None = None
    public_key: bytes = b""
    signature: bytes = b""


@message("mesh.Retransmit")
@dataclass
class Retransmit:
    """A receiver -> the sender: the step arrived corrupted; send it again."""

    term: int
    version: int
    session: str
    step: int
    reason: str


@message("mesh.TokenOut")
@dataclass
class TokenOut:
    """The last stage -> the first stage (ring) and the serving node."""

    term: int
    version: int
    session: str
    seq: int
    token: int
    finish_reason: str | None = None


@message("mesh.SessionFailed")
@dataclass
class SessionFailed:
    """A stage -> the serving node: this session cannot go on (bad input, load error)."""

    term: int
    version: int
    session: str
    error: str


@message("mesh.EndSession")
@dataclass
class EndSession:
    """Serving node -> every stage: the session is done or cancelled; free its KV cache."""

    session: str


@message("mesh.StepLost")
@dataclass
class StepLost:
    """A stage -> the serving node: a step of this session could not be handed to the
    next node (no link to it yet, or none any more). The serving node may replay the
    session once it has stalled (`Serving.check_stalls`)."""

    term: int
    version: int
    session: str
    step: int
