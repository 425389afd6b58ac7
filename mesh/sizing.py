"""What a node offers and what a model needs: the planner's inputs, measured or stated."""

from __future__ import annotations

import platform
import uuid
from pathlib import Path

import blake3

from kernels.config import ModelConfig
from mesh.errors import MeshError
from mesh.planner import ModelProfile

KV_BYTES_PER_VALUE = 4  # both backends keep the KV cache in float32


class MemoryBudgetError(MeshError):
    """A node's --memory cannot work: more than the machine has, or too little for one layer."""


def kv_bytes_per_layer(c: ModelConfig, sessions: int, context: int) -> int:
    """The KV cache one layer holds for ``sessions`` sessions of ``context`` tokens (keys and values)."""
    return 2 * c.n_kv_heads * c.head_dim * KV_BYTES_PER_VALUE * min(context, c.context_length) * sessions


def model_profile(c: ModelConfig, weight_mode: str, *, kv_sessions: int = 0, kv_context: int = 0) -> ModelProfile:
    """The bytes a model's layers, embedding and head take in ``weight_mode``, and the KV
    cache each layer reserves for ``kv_sessions`` concurrent sessions of ``kv_context`` tokens."""
    kv = c.n_kv_heads * c.head_dim
    layer_params = 2 * c.hidden * c.hidden + 2 * c.hidden * kv + 3 * c.hidden * c.intermediate + 2 * c.hidden
    embed = c.vocab_size * c.hidden
    bytes_per = 4 if weight_mode == "float32" else 1
    return ModelProfile(n_layers=c.n_layers, layer_bytes=layer_params * bytes_per, embed_bytes=embed * 4,
                        head_bytes=embed * bytes_per + c.hidden * 4,
                        head_shares_embed=c.tie_embeddings and weight_mode == "float32",
                        kv_bytes_per_layer=kv_bytes_per_layer(c, kv_sessions, kv_context))


def check_budget(budget: int, profile: ModelProfile, machine_bytes: int, *, flag: str = "--memory") -> None:
    """Refuse a budget larger than the machine's RAM, or too small for one layer and its KV
    reserve (0 is no layers at all, on purpose)."""
    if budget > machine_bytes:
        raise MemoryBudgetError(f"{flag} {mib(budget)} is more than this machine has ({mib(machine_bytes)} of RAM); "
                                f"give at most {mib(machine_bytes)}")
    one = profile.layer_bytes + profile.kv_bytes_per_layer
    if 0 < budget < one:  # 0 offers no layers on purpose: a node that only votes and serves clients
        raise MemoryBudgetError(
            f"{flag} {mib(budget)} cannot hold even one layer: a layer needs {mib(one)} "
            f"({mib(profile.layer_bytes)} of weights + {mib(profile.kv_bytes_per_layer)} of KV cache reserved); "
            f"give at least {mib(one)}, or reserve KV for fewer sessions or a shorter context")


class ModelDoesNotFit(MeshError):
    """One device's budget cannot hold the whole model; says how many MiB are missing."""


def model_bytes(profile: ModelProfile) -> int:
    """The whole model on one device: every layer with its KV reserve, the embedding and the head."""
    return profile.n_layers * (profile.layer_bytes + profile.kv_bytes_per_layer) + profile.ends_bytes(True, True)


def check_fits(budget: int, profile: ModelProfile, model: str, weight_mode: str, *, flag: str = "--memory") -> None:
    """Refuse a budget that cannot hold the whole model, with how many MiB are missing."""
    needed = model_bytes(profile)
    if needed <= budget:
        return
    kv = profile.n_layers * profile.kv_bytes_per_layer
    missing = -(-(needed - budget) // (1 << 20))
    raise ModelDoesNotFit(
        f"{model} does not fit in {flag} {mib(budget)}: it needs {mib(needed)} ({mib(needed - kv)} of weights, "
        f"{mib(kv)} of KV cache); {missing} MiB missing. Give more {flag}"
        f"{', use --weight-mode quant' if weight_mode == 'float32' else ''}, "
        "or split it over several devices with `mesh join`")


def mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def device(backend: str) -> str:
    if backend == "mlx":
        return "metal" if platform.system() == "Darwin" else "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def measure_speed(path: str | Path, backend: str, weight_mode: str) -> tuple[float, str]:
    """The speed score (decoder layers per second in a decode step, kernels.probe) of this
    device on the model's own layer shape, backend and weight mode, and where it came from."""
    from kernels.probe import measure_decode_rate

    rate = measure_decode_rate(path, backend, weight_mode)
    return float(f"{rate.layers_per_s:.3g}"), rate.describe()


def observed_speed(layers: tuple[int, int] | None, best_s: float, samples: int, measured: str,
                   *, min_samples: int = 16) -> tuple[float, str] | None:
    """The speed score refined from this node's own stage: its layers over its best
    one-session decode step, once ``min_samples`` steps were seen (None before). The
    stage host records no step of a stage that holds the head (see StageStats)."""
    if layers is None or samples < min_samples or not best_s > 0:
        return None
    start, end = layers
    score = float(f"{(end - start) / best_s:.3g}")
    return score, (f"observed: best of {samples} one-session decode steps of layers {start}-{end - 1} on this node "
                   f"; at start, {measured}")


def host_id() -> str:
    """Who shares this machine's hardware: nodes with the same host id (the loopback demo,
    several containers on one kernel) get equal shares. The kernel's boot id where there
    is one, else the machine id or the hostname and MAC address; hashed, it names nothing."""
    for source in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            text = Path(source).read_text().strip()
        except OSError:
            continue
        if text:
            break
    else:
        text = f"{platform.node()} {uuid.getnode():012x}"
    return blake3.blake3(b"mesh host " + text.encode()).hexdigest()[:16]


def memory_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    units = {"k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20, "g": 1e9, "gb": 1e9,
             "gib": 1 << 30, "": 1}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in units or not num:
        raise ValueError(f"{text!r} is not a size like 2GiB or 512MiB")
    return int(float(num) * units[unit])
