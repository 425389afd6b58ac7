"""Verification: signed, chained commitments and optimistic audits.

- ``commitment``: per-step records (Merkle leaves), batches signed with the node key;
- ``recorder``: the stage side — commit every step, keep what an auditor needs, faults;
- ``ledger``: the coordinator side — the commitment log, chain links, audit selection
  from a secret beacon, escalation to a second auditor, flags;
- ``auditor``: re-run a committed stage step and compare within the tolerance;
- ``schedule``: when the auditor runs its passes (gather, probation, deferral, turn order), pure;
- ``tolerance``: calibrated tolerances per numeric class, the canonical-grid baseline;
- ``faults``: test-only misbehaviour (``--fault``);
- ``service``: wires all of it into a Node.

See docs/verification.md.
"""
