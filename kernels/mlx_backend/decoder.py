"""The decoder of every architecture kernels runs (Llama, Mistral, Qwen2/3, Qwen3-MoE, Gemma 3) in MLX.

Plain tensor code in the manner of mlx-lm, one decoder whose per-architecture
differences are named fields of ``ModelConfig`` (see kernels/config.py)::

    h = x + PostNorm(Attention(RMSNorm(x)))  # grouped-query attention, rotary positions;
                                             # q/k normed per head (qk_norm); a sliding
                                             # window and its own RoPE base on some layers
    y = h + PostNorm(MLP(RMSNorm(h)))        # down(act(gate(h)) * up(h)), act silu or
                                             # gelu_tanh; or the top-k of routed experts

PostNorm is an RMSNorm with Gemma 3's ``sandwich_norms`` and the identity otherwise;
Gemma 3 also scales the embeddings (``embed_scale``) and may soft-cap the logits.

Weights come from ``kernels.weights.load_weights`` with Hugging Face names and layout
(q/k rows already un-permuted), so RoPE is the "rotate half" form (``traditional=False``).

Weight modes:

- ``float32``: every matrix dequantized to float32 once, at load time.
- ``quant``: the GGUF blocks mapped onto MLX's affine group-32 format by
  ``kernels.mlx_backend.quant`` (repacked exactly where the type is that format,
  requantized to 8 bits where it is not).

KV cache: per session and layer, preallocated buffers ``(n_kv_heads, capacity,
head_dim)`` grown in steps of ``CACHE_STEP`` positions, written in place by slice
assignment. A step's matrix products run on the rows of every item at once (one
batched decode for several 1-token items); rotary embedding, the cache write and
attention run per session, since sessions sit at different positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from kernels.config import ModelConfig
from kernels.mlx_backend import quant
from kernels.stage import Stage, StageInputError, StageSpec, StepInput, output_rows
from kernels.weights import QuantTensor, StageWeights, load_weights

CACHE_STEP = 256
GROUP = 32


@dataclass
class Matrix:
    """A weight ``W`` of shape ``(out, in)``; ``self(x)`` is ``x @ W.T``.

    Float32 weights are kept transposed, ``(in, out)`` contiguous: a matrix-vector
    product reads them row after row, which is what a plain CPU BLAS does fastest
    (the MLX CPU wheel links the reference BLAS). Quantized weights keep MLX's layout:
    packed uint32 codes ``(out, in * bits / 32)`` with scales and biases ``(out, in / 32)``.
    """

    weight: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int = 0  # 0: float32, transposed

    def __call__(self, x: mx.array) -> mx.array:
        if not self.bits:
            return x @ self.weight
        return mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                   group_size=GROUP, bits=self.bits)

    def rows(self, ids: mx.array) -> mx.array:
        """Rows ``ids`` of ``W`` as float32: an embedding lookup."""
        if not self.bits:
            return self.weight[:, ids].T
        return mx.dequantize(self.weight[ids], self.scales[ids], self.biases[ids], group_size=GROUP, bits=self.bits)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.weight, self.scales, self.biases) if a is not None)


def to_matrices(parts: list[np.ndarray | QuantTensor]) -> list[Matrix]:
    """Weights stacked along their rows into as few matrices as possible (q|k|v, gate|up):
    one matrix product instead of several. Parts of different storage stay separate."""
    groups: list[list[np.ndarray | QuantTensor]] = []
    for t in parts:
        if groups and quant.kind(groups[-1][-1]) == quant.kind(t):
            groups[-1].append(t)
        else:
            groups.append([t])
    matrices = []
    for group in groups:
        if not isinstance(group[0], QuantTensor):
            w = np.concatenate([np.asarray(t, dtype=np.float32) for t in group], axis=0)
            matrices.append(Matrix(mx.array(np.ascontiguousarray(w.T))))
            continue
        matrices.append(Matrix(*quant.quantized(group)))
    return matrices


@dataclass
class Projection:
    """``x @ [W1; W2; ...].T``: the outputs of several weights side by side."""

    matrices: list[Matrix]

    def __call__(self, x: mx.array) -> mx.array:
        outputs = [m(x) for m in self.matrices]
        return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=-1)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.matrices)


@dataclass
class MLP:
    gate_up: Projection  # gate | up rows stacked
    down: Projection


@dataclass
class RoutedMLP:
    """Top-k of ``n_experts`` MLPs per token, weighted by the router's softmax (qwen3moe)."""

    router: Projection
    experts: list[MLP]


@dataclass
class Layer:
    input_norm: mx.array
    qkv: Projection  # q | k | v rows stacked
    qkv_bias: mx.array | None
    o: Projection
    mlp_norm: mx.array
    mlp: MLP | RoutedMLP
    q_norm: mx.array | None = None
    k_norm: mx.array | None = None
    post_attention_norm: mx.array | None = None  # sandwich norms (gemma3)
    post_mlp_norm: mx.array | None = None

    def vectors(self) -> list[mx.array]:
        return [a for a in (self.input_norm, self.qkv_bias, self.mlp_norm, self.q_norm, self.k_norm,
                            self.post_attention_norm, self.post_mlp_norm) if a is not None]


@dataclass
class KVCache:
    """One session's keys and values for every layer of the stage."""

    keys: list[mx.array | None]
    values: list[mx.array | None]
    length: int = 0
    capacity: int = 0

    def reserve(self, needed: int, n_kv_heads: int, head_dim: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = (needed + CACHE_STEP - 1) // CACHE_STEP * CACHE_STEP
        shape = (n_kv_heads, new_cap - self.capacity, head_dim)
        # A fresh array per buffer: slice assignment mutates the array object in place.
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                grow = mx.zeros(shape, dtype=mx.float32)
                buffers[i] = grow if old is None else mx.concatenate([old[:, :self.capacity], grow], axis=1)
        self.capacity = new_cap


@dataclass
class _Step:
    """An item inside one forward call: where its rows sit and where its positions start."""

    cache: KVCache
    start: int
    rows: slice
    length: int
    masks: dict[int, tuple[int, mx.array | None]]

    def mask(self, window: int) -> tuple[int, mx.array | None]:
        """The first key position this step's queries may see, and the mask from there."""
        if window not in self.masks:
            self.masks[window] = _mask(self.start, self.length, window)
        return self.masks[window]


class MLXDecoderStage(Stage):
    backend = "mlx"

    def __init__(self, weights: StageWeights, weight_mode: str) -> None:
        self.spec: StageSpec = weights.spec
        self.config: ModelConfig = weights.config
        self.weight_mode = weight_mode
        self._digest = weights.source_digest
        w = weights.tensors
        c = self.config
        projections: list[Projection] = []
        by_source: dict[int, Projection] = {}  # a tied head reuses the embedding's matrix

        def projection(*names: str) -> Projection:
            source = id(w[names[0]]) if len(names) == 1 else None
            if source not in by_source:
                projections.append(Projection(to_matrices([w[n] for n in names])))
                if source is not None:
                    by_source[source] = projections[-1]
                return projections[-1]
            return by_source[source]

        def of(*arrays: np.ndarray) -> Projection:
            projections.append(Projection(to_matrices(list(arrays))))
            return projections[-1]

        def vector(name: str) -> mx.array | None:
            return mx.array(np.asarray(w[name], dtype=np.float32)) if name in w else None

        def norm(name: str) -> mx.array | None:
            """An RMSNorm's multiplier: ``norm_offset + w`` (Gemma's ``1 + w``)."""
            v = vector(name)
            return v + c.norm_offset if v is not None and c.norm_offset else v

        self.embed = projection("model.embed_tokens.weight").matrices[0] if self.spec.embed else None
        self.layers: list[Layer] = []
        for i in self.spec.layers():
            p = f"model.layers.{i}."
            qkv = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
            if c.moe:
                # experts stay float32, in both modes (a stretch: no quantized expert kernel)
                gate, up, down = (_float(w[f"{p}mlp.experts.{n}_proj.weight"]) for n in ("gate", "up", "down"))
                mlp: MLP | RoutedMLP = RoutedMLP(projection(p + "mlp.gate.weight"),
                                                 [MLP(of(gate[e], up[e]), of(down[e])) for e in range(c.n_experts)])
            else:
                mlp = MLP(projection(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                          projection(p + "mlp.down_proj.weight"))
            sandwich = c.sandwich_norms
            self.layers.append(Layer(
                input_norm=norm(p + "input_layernorm.weight"),
                qkv=projection(*qkv),
                qkv_bias=mx.concatenate([vector(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
                if c.qkv_bias else None,
                o=projection(p + "self_attn.o_proj.weight"),
                mlp_norm=norm(p + ("pre_feedforward_layernorm.weight" if sandwich
                                     else "post_attention_layernorm.weight")),
                mlp=mlp,
                q_norm=norm(p + "self_attn.q_norm.weight"),
                k_norm=norm(p + "self_attn.k_norm.weight"),
                post_attention_norm=norm(p + "post_attention_layernorm.weight") if sandwich else None,
                post_mlp_norm=norm(p + "post_feedforward_layernorm.weight"),
            ))
        self._windows = [c.window(i) for i in self.spec.layers()]
        self._rope_bases = [c.rope_base(i) for i in self.spec.layers()]
        self.norm = norm("model.norm.weight") if self.spec.head else None
        self.lm_head = projection("lm_head.weight") if self.spec.head else None
        vectors = [a for layer in self.layers for a in layer.vectors()]
        vectors += [self.norm] if self.norm is not None else []
        matrices = [m for proj in projections for m in proj.matrices]
        self._param_bytes = sum(m.nbytes for m in matrices) + sum(a.nbytes for a in vectors)
        mx.eval([[m.weight, m.scales, m.biases] for m in matrices], vectors)
        self._caches: dict[str, KVCache] = {}

    # -- Stage interface ---------------------------------------------------------------------

    @property
    def weights_digest(self) -> bytes:
        return self._digest

    @property
    def param_bytes(self) -> int:
        return self._param_bytes

    def cache_len(self, session: str) -> int:
        cache = self._caches.get(session)
        return 0 if cache is None else cache.length

    def free(self, session: str) -> None:
        self._caches.pop(session, None)

    def forward(self, items: list[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        self.check_items(items)
        if not items:
            return []
        c = self.config
        if self.spec.embed:
            ids = np.concatenate([np.asarray(it.tokens, dtype=np.int64).reshape(-1) for it in items])
            if ids.min() < 0 or ids.max() >= c.vocab_size:
                raise StageInputError(f"token id out of range [0, {c.vocab_size})")
            x = self.embed.rows(mx.array(ids.astype(np.int32)))
            if c.embed_scale != 1.0:
                x = x * c.embed_scale
        else:
            x = mx.array(np.concatenate([np.asarray(it.hidden, dtype=np.float32) for it in items], axis=0))

        steps: list[_Step] = []
        offset = 0
        for it in items:
            cache = self._caches.get(it.session)
            if cache is None:
                cache = self._caches[it.session] = KVCache([None] * len(self.layers), [None] * len(self.layers))
            cache.length = it.start_pos  # a start below the cached length truncates (replay)
            cache.reserve(it.start_pos + it.length, c.n_kv_heads, c.head_dim)
            steps.append(_Step(cache, it.start_pos, slice(offset, offset + it.length), it.length, {}))
            offset += it.length

        for index, layer in enumerate(self.layers):
            x = self._layer(index, layer, x, steps)
        for step, it in zip(steps, items):
            step.cache.length = it.start_pos + it.length

        if not self.spec.head:
            mx.eval(x)
            out = np.array(x, dtype=np.float32, copy=False)
            return [np.ascontiguousarray(out[s.rows]) for s in steps]
        rows = [[s.rows.start + r for r in output_rows(it, all_logits)] for s, it in zip(steps, items)]
        picked = mx.take(x, mx.array([r for rs in rows for r in rs], dtype=mx.int32), axis=0)
        logits = _softcap(self.lm_head(mx.fast.rms_norm(picked, self.norm, c.rms_eps)), c.final_logit_softcap)
        mx.eval(logits)
        logits_np = np.array(logits, dtype=np.float32, copy=False)
        out, start = [], 0
        for r in rows:
            n = len(r)
            out.append(np.ascontiguousarray(logits_np[start:start + n]))
            start += n
        return out

    # -- the decoder layer -------------------------------------------------------------------

    def _layer(self, index: int, layer: Layer, x: mx.array, steps: list[_Step]) -> mx.array:
        c = self.config
        h = mx.fast.rms_norm(x, layer.input_norm, c.rms_eps)
        qkv = layer.qkv(h)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        q, k, v = qkv[:, :q_dim], qkv[:, q_dim:q_dim + kv_dim], qkv[:, q_dim + kv_dim:]
        outputs = [self._attend(index, q[s.rows], k[s.rows], v[s.rows], s, layer) for s in steps]
        attn = layer.o(outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0))
        if layer.post_attention_norm is not None:
            attn = mx.fast.rms_norm(attn, layer.post_attention_norm, c.rms_eps)
        x = x + attn
        h = mx.fast.rms_norm(x, layer.mlp_norm, c.rms_eps)
        y = self._routed(layer.mlp, h) if isinstance(layer.mlp, RoutedMLP) else self._mlp(layer.mlp, h)
        if layer.post_mlp_norm is not None:
            y = mx.fast.rms_norm(y, layer.post_mlp_norm, c.rms_eps)
        return x + y

    def _mlp(self, mlp: MLP, h: mx.array) -> mx.array:
        gate, up = mx.split(mlp.gate_up(h), 2, axis=-1)
        act = _gelu_tanh(gate) if self.config.activation == "gelu_tanh" else _silu(gate)
        return mlp.down(act * up)

    def _routed(self, mlp: RoutedMLP, h: mx.array) -> mx.array:
        """Softmax over the router's logits, the top ``n_experts_used`` per token (renormalized
        to sum 1 when the config says so), each chosen expert run on the tokens that chose it."""
        c = self.config
        probs = mx.softmax(mlp.router(h), axis=-1)
        chosen = mx.argsort(-probs, axis=-1)[:, :c.n_experts_used]
        weight = mx.take_along_axis(probs, chosen, axis=-1)
        if c.expert_weights_norm:
            weight = weight / weight.sum(axis=-1, keepdims=True)
        chosen_np = np.array(chosen)
        out = mx.zeros_like(h)
        for e in np.unique(chosen_np).tolist():
            rows, rank = (mx.array(a) for a in np.nonzero(chosen_np == e))
            y = self._mlp(mlp.experts[e], h[rows])
            out = out.at[rows].add(y * weight[rows, rank][:, None])
        return out

    def _attend(self, index: int, q: mx.array, k: mx.array, v: mx.array, step: _Step, layer: Layer) -> mx.array:
        """One session's attention over its cache: rows ``(T, n_heads * head_dim)`` in and out."""
        c = self.config
        t = q.shape[0]
        # (T, heads * dim) -> (1, heads, T, dim)
        q = q.reshape(t, c.n_heads, c.head_dim)
        k = k.reshape(t, c.n_kv_heads, c.head_dim)
        if layer.q_norm is not None:
            q = mx.fast.rms_norm(q, layer.q_norm, c.rms_eps)
            k = mx.fast.rms_norm(k, layer.k_norm, c.rms_eps)
        q = q.transpose(1, 0, 2)[None]
        k = k.transpose(1, 0, 2)[None]
        v = v.reshape(t, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
        base = self._rope_bases[index]
        q = mx.fast.rope(q, c.head_dim, traditional=False, base=base, scale=1.0, offset=step.start)
        k = mx.fast.rope(k, c.head_dim, traditional=False, base=base, scale=1.0, offset=step.start)[0]
        cache, end = step.cache, step.start + t
        cache.keys[index][:, step.start:end, :] = k
        cache.values[index][:, step.start:end, :] = v
        lo, mask = step.mask(self._windows[index])
        keys = cache.keys[index][None, :, lo:end, :]
        values = cache.values[index][None, :, lo:end, :]
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=c.attn_scale, mask=mask)
        return out[0].transpose(1, 0, 2).reshape(t, c.n_heads * c.head_dim)


def _float(w: np.ndarray | QuantTensor) -> np.ndarray:
    return w.dequantize() if isinstance(w, QuantTensor) else w


def _silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


def _gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation (PyTorch's ``approximate="tanh"``, Gemma's hidden_activation)."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _softcap(x: mx.array, cap: float) -> mx.array:
    return x if not cap else mx.tanh(x / cap) * cap


def _mask(start: int, length: int, window: int) -> tuple[int, mx.array | None]:
    """For queries at ``start .. start+length-1``: the first key they may see, and a boolean
    mask over keys from there (None for one query without a window cut: it sees them all).
    Query ``i`` sees keys ``max(0, i - window + 1) .. i`` (``window`` 0: from 0)."""
    lo = max(0, start - window + 1) if window else 0
    if length == 1:
        return lo, None
    query_pos = mx.arange(start, start + length)[:, None]
    key_pos = mx.arange(lo, start + length)[None, :]
    allowed = key_pos <= query_pos
    if window:
        allowed = allowed & (key_pos > query_pos - window)
    return lo, allowed


def load_mlx_stage(path: str | Path, spec: StageSpec, weight_mode: str = "float32") -> MLXDecoderStage:
    """Load the layers of ``spec`` from a GGUF file or HF directory onto MLX (Metal, or CPU)."""
    return MLXDecoderStage(load_weights(path, spec, weight_mode), weight_mode)
