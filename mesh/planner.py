"""Layer placement: which node runs which contiguous layer range (sans-IO).

The planner is a pure function of its inputs — the nodes' free memory, measured
speed and backend, and the model's size profile — so every node that runs it on the
same inputs gets the same plan. Layers are shared in proportion to speed, capped by
what each node's memory holds, so a slow node does not become the bottleneck and a
small node is not overfilled. Nodes on the same host share its hardware, so they share
by the best score measured there (equal shares): scores measured at the same time on
one machine differ by contention, not by hardware. The first stage also holds the embedding, the last the
final norm and the head (and samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from mesh.errors import MeshError


class InsufficientMemory(MeshError):
    """The nodes together cannot hold the model; says how much is missing."""

    def __init__(self, missing_bytes: int, needed_bytes: int, available_bytes: int):
        self.missing_bytes = missing_bytes
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        super().__init__(
            f"the cluster cannot hold the model: it needs {_mib(needed_bytes)} but the nodes have "
            f"{_mib(available_bytes)} free; {_mib(missing_bytes)} missing — add a node or free memory"
        )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    free_memory: int  # bytes the node offers for weights and KV caches
    speed: float  # relative speed (layers per second on a decode step); > 0
    backend: str = "torch"
    host: str = ""  # nodes with the same (non-empty) host share one machine's hardware


@dataclass(frozen=True)
class ModelProfile:
    n_layers: int
    layer_bytes: int  # weights of one decoder layer, as the backend holds them
    embed_bytes: int  # embedding table (first stage)
    head_bytes: int  # final norm + lm_head (last stage; the embedding again when tied)
    kv_bytes_per_layer: int = 0  # KV cache reserve per layer (sessions x context)
    head_shares_embed: bool = False  # a stage holding both keeps one table (a tied head in float32)

    def ends_bytes(self, first: bool, last: bool) -> int:
        """What a stage holds beside its layers: the embedding on the first, the head on the last."""
        if first and last and self.head_shares_embed:
            return self.embed_bytes
        return (self.embed_bytes if first else 0) + (self.head_bytes if last else 0)


@dataclass(frozen=True)
class StageAssignment:
    index: int
    node_id: str
    start: int
    end: int
    backend: str

    @property
    def n_layers(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Plan:
    stages: tuple[StageAssignment, ...]
    n_layers: int

    @property
    def nodes(self) -> list[str]:
        return [s.node_id for s in self.stages]


@dataclass
class _Slot:
    cap: NodeCapacity
    max_layers: int
    layers: int = 0
    extra: int = field(default=0)


def plan(nodes: list[NodeCapacity], model: ModelProfile, *, max_stages: int | None = None) -> Plan:
    """Split the model's layers over ``nodes`` (order-independent, deterministic).

    Every given node that can hold at least one layer gets a stage, up to
    ``max_stages`` (fastest first). With ``max_stages=1`` the model runs on the one
    fastest node that holds it all: the single-device fallback.
    """
    if model.n_layers <= 0:
        raise ValueError("a model needs at least one layer")
    per_layer = model.layer_bytes + model.kv_bytes_per_layer
    ordered = sorted(same_host_speeds(nodes), key=lambda n: (-n.speed, n.node_id))
    if max_stages == 1:
        whole = model.n_layers * per_layer + model.ends_bytes(True, True)
        for cap in ordered:
            if cap.free_memory >= whole:
                return Plan((StageAssignment(0, cap.node_id, 0, model.n_layers, cap.backend),), model.n_layers)
        best = max((c.free_memory for c in ordered), default=0)
        raise InsufficientMemory(whole - best, whole, best)
    chosen = ordered[: max_stages or len(ordered)]
    # Ring order: by node id, so the plan does not depend on the order nodes were listed.
    chosen.sort(key=lambda n: n.node_id)
    return _fill(chosen, model, per_layer)


def same_host_speeds(nodes: list[NodeCapacity]) -> list[NodeCapacity]:
    """Each node with the speed the planner uses: on a shared host, the best score
    measured there (contention only ever lowers a measurement)."""
    best: dict[str, float] = {}
    for n in nodes:
        if n.host:
            best[n.host] = max(best.get(n.host, 0.0), n.speed)
    return [replace(n, speed=best[n.host]) if n.host and best[n.host] != n.speed else n for n in nodes]


def _fill(chosen: list[NodeCapacity], model: ModelProfile, per_layer: int) -> Plan:
    needed = model.n_layers * per_layer + model.embed_bytes + model.head_bytes
    available = sum(c.free_memory for c in chosen)
    while chosen:
        slots = []
        for i, cap in enumerate(chosen):
            fixed = model.ends_bytes(i == 0, i == len(chosen) - 1)
            room = cap.free_memory - fixed
            slots.append(_Slot(cap, max(0, room // per_layer) if per_layer else model.n_layers))
        useless = [s for s in slots if s.max_layers == 0]
        if not useless:
            break
        if len(chosen) == 1:
            chosen = []
            break
        # Drop the node with the least room and try again with the others.
        drop = min(useless, key=lambda s: (s.cap.free_memory, s.cap.node_id))
        chosen = [c for c in chosen if c.node_id != drop.cap.node_id]
    if not chosen or sum(s.max_layers for s in slots) < model.n_layers:
        raise InsufficientMemory(max(needed - available, 1), needed, available)
    _share_by_speed(slots, model.n_layers)
    stages, start = [], 0
    for slot in slots:
        if slot.layers == 0:
            continue
        stages.append(StageAssignment(len(stages), slot.cap.node_id, start, start + slot.layers, slot.cap.backend))
        start += slot.layers
    return Plan(tuple(stages), model.n_layers)


def _share_by_speed(slots: list[_Slot], n_layers: int) -> None:
    """Water-fill: layers in proportion to speed, capped by memory, every slot >= 1."""
    remaining = n_layers
    open_slots = list(slots)
    while remaining > 0 and open_slots:
        total_speed = sum(s.cap.speed for s in open_slots)
        quotas = [remaining * s.cap.speed / total_speed for s in open_slots]
        capped = [s for s, q in zip(open_slots, quotas) if q >= s.max_layers - s.layers]
        if capped:
            for s in capped:
                remaining -= s.max_layers - s.layers
                s.layers = s.max_layers
            open_slots = [s for s in open_slots if s not in capped]
            continue
        floors = [int(q) for q in quotas]
        for s, f in zip(open_slots, floors):
            s.layers += f
        left = remaining - sum(floors)
        # Largest remainder, ties broken by node id: deterministic.
        order = sorted(range(len(open_slots)), key=lambda i: (-(quotas[i] - floors[i]), open_slots[i].cap.node_id))
        for i in order[:left]:
            open_slots[i].layers += 1
        remaining = 0
    # Every chosen node gets at least one layer when there are enough layers.
    for s in slots:
        if s.layers == 0 and n_layers >= len(slots):
            donor = max(slots, key=lambda d: (d.layers, d.cap.node_id))
            if donor.layers > 1:
                donor.layers -= 1
                s.layers = 1

