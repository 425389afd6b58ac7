"""Seeded detection: an audit seed fixes the ledger's beacon secret per term (a skipped
layer caught on a seeded mesh: tests/inproc/test_verification.py). Benches set it on
node processes as MESH_AUDIT_SEED, which `mesh join` alone reads (VerifyConfig.from_env)."""

from __future__ import annotations

import blake3

from mesh.verify.ledger import Ledger
from mesh.verify.service import VerifyConfig


def _secret(term: int, seed: str | None) -> bytes:
    ledger = Ledger("c", lambda *_: None, lambda _: None, audit_seed=seed)
    ledger.take_office(term)
    return ledger.secret


def test_the_audit_seed_fixes_the_secret_per_term():
    assert _secret(1, "7") == _secret(1, "7") == blake3.blake3(b"mesh audit seed7" + (1).to_bytes(8, "little")).digest()
    assert _secret(2, "7") != _secret(1, "7")
    assert _secret(1, "8") != _secret(1, "7")


def test_without_the_seed_every_ledger_draws_its_own_secret():
    a, b = _secret(1, None), _secret(1, None)
    assert a != b and len(a) == len(b) == 32


def test_the_join_command_reads_the_benches_variables():
    config = VerifyConfig.from_env({"MESH_AUDIT_SEED": "7", "MESH_VERIFY": "off", "MESH_AUDIT_DEFER_S": "30"},
                                   audit_rate=0.5)
    assert (config.audit_seed, config.enabled, config.defer_s, config.audit_rate) == ("7", False, 30.0, 0.5)
    assert VerifyConfig.from_env({}) == VerifyConfig()
