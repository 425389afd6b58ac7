"""Signed commitments: per-step leaves, a Merkle root per chunk, one Ed25519 signature.

A leaf is BLAKE3 over a length-prefixed encoding of one StepRecord; the signature
covers the batch header and the Merkle root. Changing any field of any record, or
of the header, changes what was signed. The node id is BLAKE3 of the public key, so a
batch signed with another node's key is rejected even if the signature is valid.
"""

from __future__ import annotations

import struct

import blake3

from actors.identity import NodeIdentity, node_id_of
from mesh.errors import MeshError
from mesh.verify.messages import CommitBatch, StepRecord

_LEAF = b"mesh-commit-leaf\x00"
_NODE = b"mesh-commit-node\x00"
_HEADER = b"mesh-commit-batch\x00"
_FORWARD = b"mesh-forward\x00"


class CommitmentRejected(MeshError):
    """A commitment batch failed verification; the message says which check."""


def signed_fields(*parts: object) -> bytes:
    """Length-prefixed fields: what a signature covers, with no two field lists alike."""
    out = bytearray()
    for p in parts:
        if isinstance(p, bytes):
            b = p
        elif isinstance(p, str):
            b = p.encode()
        else:
            b = struct.pack("<q", int(p))
        out += struct.pack("<I", len(b)) + b
    return bytes(out)


def leaf_hash(r: StepRecord) -> bytes:
    signed = signed_fields(r.input_signature) if r.input_signature else b""  # the first stage's inputs carry none
    return blake3.blake3(_LEAF + signed_fields(r.session, r.step, r.start_pos, r.length, r.input_digest,
                                         r.output_digest, r.token) + signed).digest()


def forward_bytes(term: int, version: int, session: str, step: int, start_pos: int, sender: str,
                  digest: bytes) -> bytes:
    """What a stage signs on each Forward it sends: "in plan (term, version), my output for
    step ``step`` of ``session`` at ``start_pos`` is the tensor with this digest". The next
    stage keeps the signature in its own record of that step; if the sender's signed
    commitment of the step names another digest, its two signatures contradict each other."""
    return _FORWARD + signed_fields(term, version, session, step, start_pos, sender, digest)


def forward_signed(public_key: bytes, signature: bytes, term: int, version: int, session: str, step: int,
                   start_pos: int, sender: str, digest: bytes) -> bool:
    """Whether ``signature`` is ``sender``'s (the key's node) on that Forward."""
    if len(public_key) != 32 or len(signature) != 64 or node_id_of(public_key) != sender:
        return False
    return NodeIdentity.verify(public_key, forward_bytes(term, version, session, step, start_pos, sender, digest),
                               signature)


def merkle_levels(leaves: list[bytes]) -> list[list[bytes]]:
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        cur = levels[-1]
        nxt = [blake3.blake3(_NODE + cur[i] + (cur[i + 1] if i + 1 < len(cur) else cur[i])).digest()
               for i in range(0, len(cur), 2)]
        levels.append(nxt)
    return levels


def merkle_root(leaves: list[bytes]) -> bytes:
    if not leaves:
        return blake3.blake3(_NODE).digest()
    return merkle_levels(leaves)[-1][0]


def merkle_proof(leaves: list[bytes], index: int) -> list[bytes]:
    """Sibling hashes from leaf ``index`` up to the root."""
    proof = []
    for level in merkle_levels(leaves)[:-1]:
        sib = index ^ 1
        proof.append(level[sib] if sib < len(level) else level[index])
        index //= 2
    return proof


def verify_proof(leaf: bytes, index: int, proof: list[bytes], root: bytes) -> bool:
    h = leaf
    for sib in proof:
        h = blake3.blake3(_NODE + (h + sib if index % 2 == 0 else sib + h)).digest()
        index //= 2
    return h == root


def header_bytes(b: CommitBatch) -> bytes:
    return _HEADER + signed_fields(b.term, b.version, b.stage, b.start, b.end, b.node, b.public_key, b.backend,
                             b.weight_mode, b.weights_digest, len(b.records), b.root, b.upstream_key)


def sign_batch(identity: NodeIdentity, *, term: int, version: int, stage: int, start: int, end: int,
               backend: str, weight_mode: str, weights_digest: bytes, records: list[StepRecord],
               upstream_key: bytes = b"") -> CommitBatch:
    root = merkle_root([leaf_hash(r) for r in records])
    batch = CommitBatch(term, version, stage, start, end, identity.node_id, identity.public_key, backend,
                        weight_mode, weights_digest, list(records), root, b"", upstream_key)
    batch.signature = identity.sign(header_bytes(batch))
    return batch


def verify_batch(b: CommitBatch, *, expect_node: str | None = None) -> None:
    """Raise CommitmentRejected unless the batch is intact and signed by its node."""
    if node_id_of(b.public_key) != b.node:
        raise CommitmentRejected(f"batch claims node {b.node} but its key belongs to {node_id_of(b.public_key)}")
    if expect_node is not None and b.node != expect_node:
        raise CommitmentRejected(f"batch from {b.node}, but stage {b.stage} is held by {expect_node}")
    if merkle_root([leaf_hash(r) for r in b.records]) != b.root:
        raise CommitmentRejected(f"batch of {b.node}: records do not match the signed Merkle root")
    if not NodeIdentity.verify(b.public_key, header_bytes(b), b.signature):
        raise CommitmentRejected(f"batch of {b.node}: bad signature")


def result_bytes(r) -> bytes:
    """What an auditor signs in an AuditResult."""
    return b"mesh-audit-result\x00" + signed_fields(r.audit_id, r.round, r.auditor, r.node, r.session, r.step,
                                             int(r.ok), r.reason, repr(r.max_row_rel_l2), repr(r.outside_share),
                                             r.audit_backend, int(r.inconclusive))
