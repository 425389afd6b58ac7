"""Seeded detection: MESH_AUDIT_SEED fixes the ledger's beacon secret per term, and one
seeded run of bench/detect.py on real `mesh join` processes catches a skipped layer
(a fault test_demo_fault.py does not cover): flagged before the answer ends, evicted,
and the answer completes."""

from __future__ import annotations

import asyncio
import json

import blake3
import pytest

from mesh.verify.ledger import Ledger


def _secret(term: int) -> bytes:
    ledger = Ledger("c", lambda *_: None, lambda _: None)
    ledger.take_office(term)
    return ledger.secret


def test_the_audit_seed_fixes_the_secret_per_term(monkeypatch):
    monkeypatch.setenv("MESH_AUDIT_SEED", "7")
    assert _secret(1) == _secret(1) == blake3.blake3(b"mesh audit seed7" + (1).to_bytes(8, "little")).digest()
    assert _secret(2) != _secret(1)
    monkeypatch.setenv("MESH_AUDIT_SEED", "8")
    assert _secret(1) != blake3.blake3(b"mesh audit seed7" + (1).to_bytes(8, "little")).digest()


def test_without_the_seed_every_ledger_draws_its_own_secret(monkeypatch):
    monkeypatch.delenv("MESH_AUDIT_SEED", raising=False)
    a, b = _secret(1), _secret(1)
    assert a != b and len(a) == len(b) == 32


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_seeded_run_catches_a_skipped_layer(model_path):
    from bench.detect import run_once

    record = asyncio.run(run_once("skip-layer", seed=3, timeout=240.0))
    shown = json.dumps(record)  # the whole record on failure, with its kept logs dir
    assert "error" not in record, shown
    assert record["flagged"] and record["reason"].startswith("two audits failed"), shown
    assert record["flag_token"] is not None and record["flag_token"] <= 50, shown  # before the answer ended
    assert record["evicted"], shown
    assert record["completed"] and record["tokens"] > 0, shown
