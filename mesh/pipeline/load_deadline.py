"""How long the coordinator waits for a stage to load, and how long it then keeps a node
that missed that deadline out of placement (pure: numbers in, seconds out).

A new plan stops every node serving until each stage reports StageReady, so a member
that takes layers and never answers would stall the mesh forever. The deadline must
still leave a slow honest node (an SD card, a busy disk, one core dequantizing) room
to read what it was given: it is a floor plus the stage's bytes at a deliberately low
read rate. A node past its deadline is held out for a back-off that doubles with each
deadline it misses in a row (a node that stalls on purpose costs the mesh one deadline
per back-off, not one per plan), and gets another chance when the back-off ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.pipeline.messages import StageEntry
from mesh.planner import ModelProfile


@dataclass(frozen=True)
class LoadDeadline:
    floor_s: float = 60.0  # whatever the stage: start-up, a cold disk, the first allocation
    bytes_per_s: float = float(8 << 20)  # the slowest honest load rate we allow for (8 MiB/s)
    back_off_s: float = 300.0  # out of placement after a first missed deadline
    max_back_off_s: float = 3600.0  # the cap of the doubling back-off

    def __post_init__(self) -> None:
        if not (self.floor_s > 0 and self.bytes_per_s > 0 and 0 < self.back_off_s <= self.max_back_off_s):
            raise ValueError("load deadline: floor_s, bytes_per_s and back_off_s must be > 0, "
                             "and back_off_s at most max_back_off_s")

    def for_stage(self, stage: StageEntry, n_stages: int, profile: ModelProfile) -> float:
        """Seconds a node may take to report ``stage`` of an ``n_stages``-stage plan loaded."""
        return self.floor_s + stage_bytes(stage, n_stages, profile) / self.bytes_per_s

    def back_off(self, missed_in_a_row: int) -> float:
        """Seconds out of placement after the ``missed_in_a_row``-th missed deadline (1, 2, ...)."""
        return min(self.max_back_off_s, self.back_off_s * 2.0 ** max(0, missed_in_a_row - 1))


def stage_bytes(stage: StageEntry, n_stages: int, profile: ModelProfile) -> int:
    """The weights a stage loads: its layers, the embedding on the first, the head on the last."""
    size = (stage.end - stage.start) * profile.layer_bytes
    if stage.index == 0:
        size += profile.embed_bytes
    if stage.index == n_stages - 1:
        size += profile.head_bytes
    return size
