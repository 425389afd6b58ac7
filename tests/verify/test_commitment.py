"""Signed commitments: any changed field, or another node's key, is rejected."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors import NodeIdentity, codec
from mesh.verify.commitment import (
    CommitmentRejected,
    leaf_hash,
    merkle_proof,
    merkle_root,
    sign_batch,
    verify_batch,
)
from mesh.verify.messages import CommitBatch, StepRecord


def _records(n: int = 5) -> list[StepRecord]:
    return [StepRecord("sess", s, 40 + s, 1 if s else 40, bytes([s]) * 32, bytes([100 + s]) * 32, -1)
            for s in range(n)]


def _batch(identity: NodeIdentity, records=None) -> CommitBatch:
    return sign_batch(identity, term=3, version=2, stage=1, start=10, end=20, backend="torch",
                      weight_mode="float32", weights_digest=b"w" * 32, records=records or _records())


def test_an_intact_batch_verifies_and_survives_the_wire():
    me = NodeIdentity.generate()
    batch = _batch(me)
    verify_batch(batch, expect_node=me.node_id)
    dec = codec.FrameDecoder()
    dec.receive_data(b"".join(bytes(part) for part in codec.encode_frame(batch)))
    verify_batch(dec.next_message())


HEADER_CHANGES = {"term": 4, "version": 3, "stage": 2, "start": 11, "end": 19, "backend": "mlx",
                  "weight_mode": "quant", "weights_digest": b"x" * 32, "root": b"r" * 32}
RECORD_CHANGES = {"session": "other", "step": 9, "start_pos": 7, "length": 2, "input_digest": b"i" * 32,
                  "output_digest": b"o" * 32, "token": 5}


@pytest.mark.parametrize("field,value", sorted(HEADER_CHANGES.items()))
def test_a_changed_header_field_is_rejected(field, value):
    batch = _batch(NodeIdentity.generate())
    with pytest.raises(CommitmentRejected):
        verify_batch(dataclasses.replace(batch, **{field: value}))


@pytest.mark.parametrize("field,value", sorted(RECORD_CHANGES.items()))
@pytest.mark.parametrize("index", [0, 3])
def test_a_changed_record_field_is_rejected(field, value, index):
    batch = _batch(NodeIdentity.generate())
    records = list(batch.records)
    records[index] = dataclasses.replace(records[index], **{field: value})
    with pytest.raises(CommitmentRejected, match="Merkle root"):
        verify_batch(dataclasses.replace(batch, records=records))


def test_a_dropped_or_added_record_is_rejected():
    batch = _batch(NodeIdentity.generate())
    with pytest.raises(CommitmentRejected):
        verify_batch(dataclasses.replace(batch, records=batch.records[:-1]))
    with pytest.raises(CommitmentRejected):
        verify_batch(dataclasses.replace(batch, records=batch.records + batch.records[:1]))


def test_another_nodes_key_is_rejected():
    honest, other = NodeIdentity.generate(), NodeIdentity.generate()
    forged = _batch(other)
    # claims to be the honest node, signed (validly) with another key
    with pytest.raises(CommitmentRejected, match="key belongs to"):
        verify_batch(dataclasses.replace(forged, node=honest.node_id))
    # the honest node's public key, but another key's signature
    with pytest.raises(CommitmentRejected, match="bad signature"):
        verify_batch(dataclasses.replace(forged, node=honest.node_id, public_key=honest.public_key))
    # a valid batch of another node where the plan expects the honest one
    with pytest.raises(CommitmentRejected, match="held by"):
        verify_batch(forged, expect_node=honest.node_id)


def test_a_flipped_signature_bit_is_rejected():
    batch = _batch(NodeIdentity.generate())
    sig = bytearray(batch.signature)
    sig[10] ^= 1
    with pytest.raises(CommitmentRejected, match="bad signature"):
        verify_batch(dataclasses.replace(batch, signature=bytes(sig)))


@given(st.integers(1, 40), st.data())
def test_merkle_proofs_verify_every_leaf_and_only_it(n, data):
    from mesh.verify.commitment import verify_proof

    leaves = [leaf_hash(r) for r in _records(n)]
    root = merkle_root(leaves)
    i = data.draw(st.integers(0, n - 1))
    proof = merkle_proof(leaves, i)
    assert verify_proof(leaves[i], i, proof, root)
    assert not verify_proof(b"\x00" * 32, i, proof, root)
