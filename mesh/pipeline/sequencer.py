"""Token ordering at the serving node (sans-IO).

The last stage numbers every token it samples. The serving node accepts exactly the
next number: a duplicate (an old pipeline's token arriving after a replay already
produced it, or a retransmission) is dropped, a gap (a lost token) is refused so the
session can be replayed from the last token it holds. Tokens are deterministic in
(seed, position), so the first copy of a number is as good as any later one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    GAP = "gap"


@dataclass
class TokenSequencer:
    tokens: list[int] = field(default_factory=list)
    duplicates: int = 0
    gaps: int = 0

    @property
    def next_seq(self) -> int:
        return len(self.tokens)

    def offer(self, seq: int, token: int) -> Verdict:
        if seq < self.next_seq:
            self.duplicates += 1
            return Verdict.DUPLICATE
        if seq > self.next_seq:
            self.gaps += 1
            return Verdict.GAP
        self.tokens.append(token)
        return Verdict.ACCEPTED
