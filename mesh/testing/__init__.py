"""The test and demo kits, built on the same Node every device runs.

- ``inproc``: a whole mesh in one process on the memory transport and virtual time,
  compute inline: deterministic pipeline, verification and failover scenarios in
  seconds, with rogue nodes whose handlers a test replaces;
- ``local``: N real nodes in one process on loopback TCP (``mesh.local_cluster``);
- ``launcher``: N real ``mesh join`` processes (``mesh demo``, end-to-end tests);
- ``kills``: ``kill:...`` fault specs for the demo; ``faults``: the cheating modes of
  ``--fault stage=K:MODE``; ``verify_harness``: stage steps recorded and audited in
  one process, for calibration and benches.
"""
