"""Who may become a member: the admission rule the owner picks (pure, no I/O).

The cluster secret lets a device *ask* to join; membership is by public key (node id =
BLAKE3 of the key). When a key that is not yet a member asks (`JoinRequest`), the
election asks this policy:

- `auto` (the default on a fresh home cluster): every key that proved the secret is
  admitted. The admission is logged, and the new member is listed by `mesh status`.
- `ask`: the key waits in a bounded table of pending requests (the oldest is dropped
  when it is full) until an existing member approves it (`mesh admit PREFIX`). The
  prefix is resolved against the pending keys only, so a short prefix is safe: a
  human picks among the keys that actually asked.
- `pinned`: only the listed node ids are admitted. They must be full ids: a prefix
  of a few characters could be ground out by trying key pairs.

Admission only makes a key a member. The election gives it a vote only while there are
fewer voters than `max_voters`, by seniority, so keys minted by a holder of the secret
never outnumber the members that were there first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from enum import Enum

from actors.identity import NODE_ID_HEX

from mesh.cluster.errors import ClusterError

PENDING_CAPACITY = 16
APPROVED_CAPACITY = 64


class Mode(str, Enum):
    AUTO = "auto"
    ASK = "ask"
    PINNED = "pinned"


class Verdict(str, Enum):
    ADMIT = "admit"
    PENDING = "pending"
    REFUSE = "refuse"


class AdmissionError(ClusterError):
    """A key to approve or pin that does not name exactly one node."""


def _is_node_id(text: str) -> bool:
    return len(text) == NODE_ID_HEX and all(c in "0123456789abcdef" for c in text)


class Admission:
    def __init__(self, mode: Mode | str = Mode.AUTO, pinned: Iterable[str] = (),
                 capacity: int = PENDING_CAPACITY) -> None:
        self.mode = Mode(mode)
        self.pinned = frozenset(k.lower() for k in pinned)
        bad = sorted(k for k in self.pinned if not _is_node_id(k))
        if bad:
            raise AdmissionError(f"--admit-key {bad[0]!r} is not a node id ({NODE_ID_HEX} hex characters); "
                                 "copy the full id from `mesh status` on that device")
        if self.mode is Mode.PINNED and not self.pinned:
            raise AdmissionError("--admit pinned needs at least one --admit-key NODE_ID")
        self.capacity = capacity
        self._pending: OrderedDict[str, int] = OrderedDict()  # node id -> requests seen
        self._approved: OrderedDict[str, None] = OrderedDict()

    def consider(self, node_id: str) -> Verdict:
        """A key that is not a member asks to join: admit it, keep it pending, or refuse it."""
        if self.mode is Mode.AUTO:
            return Verdict.ADMIT
        if self.mode is Mode.PINNED:
            return Verdict.ADMIT if node_id in self.pinned else Verdict.REFUSE
        if node_id in self._approved:
            return Verdict.ADMIT
        seen = self._pending.pop(node_id, 0)
        self._pending[node_id] = seen + 1  # most recent last
        while len(self._pending) > self.capacity:
            self._pending.popitem(last=False)
        return Verdict.PENDING

    def approve(self, node_id: str) -> None:
        """An existing member approved `node_id` (a full id): it is admitted when it asks next."""
        if not _is_node_id(node_id):
            raise AdmissionError(f"{node_id!r} is not a node id")
        self._pending.pop(node_id, None)
        self._approved[node_id] = None
        while len(self._approved) > APPROVED_CAPACITY:
            self._approved.popitem(last=False)

    def resolve(self, prefix: str) -> str:
        """The one pending key that starts with `prefix` (a full id is taken as it is)."""
        prefix = prefix.strip().lower()
        matches = [k for k in self._pending if k.startswith(prefix)] if prefix else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise AdmissionError(f"{prefix!r} matches {len(matches)} pending keys ({', '.join(sorted(matches))}); "
                                 "give more characters")
        if _is_node_id(prefix):
            return prefix
        raise AdmissionError(f"no pending request from a key starting with {prefix!r}; "
                             "`mesh status` lists the pending keys")

    def admitted(self, node_id: str) -> None:
        """`node_id` is a member now: forget its request and its approval."""
        self._pending.pop(node_id, None)
        self._approved.pop(node_id, None)

    def pending(self) -> tuple[str, ...]:
        """The keys waiting for approval, oldest first."""
        return tuple(self._pending)
