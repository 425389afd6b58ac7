"""Test-only misbehaviour of a stage (``mesh join --fault SPEC``), to prove audits catch it.

    tamper:scale=E     multiply every output by 1+E
    skip-layer:L       skip the stage's L-th layer (0-based within its range, clamped)
    noise:sigma=S      perturb its weights: every norm weight times (1 + S·N(0,1))
    stale              send the previous step's activations instead of this step's
    corrupt-wire       flip a bit of what it sends, after digesting and signing it
    lie-digest         send other activations downstream (the honest ones times 1.05),
                       digested and signed as sent, so the next stage takes them; commit
                       the honest output's digest and serve the honest tensor to auditors
    refuse-fetch[:M]   answer audit fetches wrongly: M = flip (one bit of an input),
                       pos (a wrong start_pos), step (a step nobody asked for), silent (no
                       answer before the auditor's deadline); without M, each in turn
    withhold[:late=S]  never send its commitments; with late=S, send each batch S seconds late

``stage=K:SPEC`` applies SPEC only if the first stage the node is given is stage K
(``mesh demo`` passes it to every node: the node that first holds stage K cheats, and
the node that takes stage K over after an eviction does not). A node that does not send activations (the last stage) has no wire to
corrupt.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import numpy as np

from mesh.errors import MeshError

KINDS = ("tamper", "skip-layer", "noise", "stale", "corrupt-wire", "lie-digest", "refuse-fetch", "withhold")
REFUSALS = ("flip", "pos", "step", "silent")
SILENT_S = 60.0  # refuse-fetch:silent answers this late: past any auditor's fetch deadline
_NORMS = ("attn_norm", "mlp_norm", "input_norm", "post_attention_norm")


class BadFaultSpec(MeshError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    value: float = 0.0
    stage: int | None = None  # None: whatever stage the node holds
    mode: str = ""  # refuse-fetch: one of REFUSALS, or "" for each in turn

    def applies(self, stage_index: int | None) -> bool:
        return stage_index is not None and (self.stage is None or self.stage == stage_index)

    # -- what the stage does wrong ------------------------------------------------------

    def corrupt_stage(self, stage) -> None:
        """skip-layer / noise: change the loaded layers in place (torch or MLX stage)."""
        if getattr(stage, "_mesh_fault", None) is not None:
            return
        stage._mesh_fault = self
        if self.kind == "skip-layer" and stage.layers:
            del stage.layers[min(int(self.value), len(stage.layers) - 1)]
        elif self.kind == "noise":
            rng = np.random.default_rng(0)
            for layer in stage.layers:
                for name in _NORMS:
                    w = getattr(layer, name, None)
                    if w is not None:
                        setattr(layer, name, _perturbed(w, self.value, rng))

    def output(self, previous: np.ndarray | None, out: np.ndarray) -> np.ndarray:
        if self.kind == "tamper":
            return (out * np.float32(1.0 + self.value)).astype(np.float32)
        if self.kind == "stale" and previous is not None and previous.shape[-1] == out.shape[-1]:
            return previous[-out.shape[0]:] if previous.shape[0] >= out.shape[0] else out
        return out

    def wire(self, tensor: np.ndarray) -> np.ndarray:
        if self.kind != "corrupt-wire":
            return tensor
        bad = np.array(tensor, copy=True)
        raw = bad.reshape(-1).view(np.uint8)
        raw[raw.size // 2] ^= 0x01
        return bad


    def garbage(self, hidden: np.ndarray) -> np.ndarray:
        """lie-digest: what it sends instead of ``hidden``."""
        return (np.asarray(hidden, dtype=np.float32) * np.float32(1.05)).astype(np.float32)

    def refuse(self, data, n: int):
        """refuse-fetch: the wrong answer to the ``n``-th fetch, whose honest answer is
        ``data`` (an AuditData); "silent" answers with an awaitable that takes SILENT_S."""
        mode = self.mode or REFUSALS[n % len(REFUSALS)]
        if mode == "silent":
            return _late(data)
        if not data.ok or not data.steps:
            return data
        if mode == "flip":
            inputs = np.array(data.inputs, copy=True)
            raw = inputs.reshape(-1).view(np.uint8)
            raw[raw.size - 1] ^= 0x01  # the last step's input
            return replace(data, inputs=inputs)
        if mode == "pos":
            return replace(data, start_pos=[*data.start_pos[:-1], data.start_pos[-1] + 1])
        return replace(data, steps=[*data.steps[:-1], data.steps[-1] + 1])  # "step"


async def _late(data):
    await asyncio.sleep(SILENT_S)
    return data


def _perturbed(w, sigma: float, rng: np.random.Generator):
    kind = type(w).__module__.split(".")[0]
    a = (w.numpy() if kind == "torch" else np.array(w)).astype(np.float32)
    a = (a * (1.0 + sigma * rng.standard_normal(a.shape))).astype(np.float32)
    if kind == "torch":
        import torch

        return torch.from_numpy(a)
    if kind == "mlx":
        import mlx.core as mx

        return mx.array(a)
    return a


def parse_fault(spec: str) -> Fault:
    """``[stage=K:]tamper:scale=E | skip-layer:L | noise:sigma=S | stale | corrupt-wire |
    lie-digest | refuse-fetch[:flip|pos|step|silent] | withhold[:late=S]``."""
    parts = spec.strip().split(":")
    stage = None
    if parts and parts[0].startswith("stage="):
        try:
            stage = int(parts.pop(0).split("=", 1)[1])
        except ValueError:
            raise BadFaultSpec(f"--fault {spec!r}: stage=K needs an integer K") from None
    if not parts or parts[0] not in KINDS:
        raise BadFaultSpec(f"--fault {spec!r}: use one of tamper:scale=E, skip-layer:L, noise:sigma=S, stale, "
                           "corrupt-wire, lie-digest, refuse-fetch[:flip|pos|step|silent], withhold[:late=S] "
                           "(optionally prefixed by stage=K:)")
    kind, args = parts[0], parts[1:]
    if kind == "refuse-fetch":
        if len(args) > 1 or (args and args[0] not in REFUSALS):
            raise BadFaultSpec(f"--fault {spec!r}: write refuse-fetch or refuse-fetch:MODE, MODE one of "
                               f"{', '.join(REFUSALS)}")
        return Fault(kind, 0.0, stage, args[0] if args else "")
    if kind == "withhold" and not args:
        return Fault(kind, 0.0, stage)
    need = {"tamper": "scale", "noise": "sigma", "skip-layer": "", "withhold": "late"}.get(kind)
    if need is None:
        if args:
            raise BadFaultSpec(f"--fault {spec!r}: {kind} takes no argument")
        return Fault(kind, 0.0, stage)
    if len(args) != 1 or (need and not args[0].startswith(need + "=")):
        raise BadFaultSpec(f"--fault {spec!r}: write {kind}:{need + '=' if need else ''}VALUE")
    try:
        value = float(args[0].split("=", 1)[1] if need else args[0])
    except ValueError:
        raise BadFaultSpec(f"--fault {spec!r}: {args[0]!r} is not a number") from None
    if value < 0 or (kind == "skip-layer" and value != int(value)):
        raise BadFaultSpec(f"--fault {spec!r}: the value must be a non-negative {'integer' if need == '' else 'number'}")
    return Fault(kind, value, stage)


def verify_args(audit_rate: float, specs: list[str]) -> list[str]:
    """`mesh join` arguments that carry a demo's --audit-rate and cheat specs to every node."""
    if len(specs) > 1:
        raise BadFaultSpec(f"one cheating stage at a time: got {', '.join(specs)}")
    for spec in specs:
        parse_fault(spec)  # refuse a bad spec here rather than in every node
    return ["--audit-rate", str(audit_rate), *(a for spec in specs for a in ("--fault", spec))]
