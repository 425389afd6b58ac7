"""Process-level faults the demo injects: SIGKILL a node after T generated tokens.

``kill:stage=K:after=T`` kills the node holding stage K; ``kill:coordinator:after=T``
kills the coordinator of that moment. Faults of the verification kind
(``stage=K:SPEC``) are applied by the nodes themselves, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import MeshError


class BadFaultSpec(MeshError):
    pass


@dataclass(frozen=True)
class KillFault:
    target: str  # "stage" | "coordinator"
    after: int  # generated tokens before the kill
    stage: int | None = None

    @property
    def kind(self) -> str:
        return self.target


def parse_kill(spec: str) -> KillFault | None:
    """A KillFault for a ``kill:...`` spec, None for other fault kinds."""
    parts = spec.split(":")
    if parts[0] != "kill":
        return None
    fields = dict(p.split("=", 1) if "=" in p else (p, "") for p in parts[1:])
    try:
        after = int(fields.pop("after"))
        if "coordinator" in fields:
            fields.pop("coordinator")
            fault = KillFault("coordinator", after)
        else:
            fault = KillFault("stage", after, int(fields.pop("stage")))
    except (KeyError, ValueError):
        raise BadFaultSpec(f"--fault {spec!r}: use kill:stage=K:after=T or kill:coordinator:after=T") from None
    if fields or after < 0:
        raise BadFaultSpec(f"--fault {spec!r}: unexpected {', '.join(fields) or 'negative after'}")
    return fault
