"""A Llama-family decoder stage (Llama, SmolLM, Mistral, Qwen2-style qkv bias) in MLX.

One readable file in the manner of mlx-lm: plain tensor code that follows the paper.

    h = x + Attention(RMSNorm(x))        # grouped-query attention, rotary positions
    y = h + MLP(RMSNorm(h))              # down(silu(gate(h)) * up(h))

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
class Layer:
    input_norm: mx.array
    qkv: Projection  # q | k | v rows stacked
    qkv_bias: mx.array | None
    o: Projection
    post_attention_norm: mx.array
    gate_up: Projection  # gate | up rows stacked
    down: Projection


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
    mask: mx.array | None = None


class MLXLlamaStage(Stage):
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

        def vector(name: str) -> mx.array:
            return mx.array(np.asarray(w[name], dtype=np.float32))

        self.embed = projection("model.embed_tokens.weight").matrices[0] if self.spec.embed else None
        self.layers: list[Layer] = []
        for i in self.spec.layers():
            p = f"model.layers.{i}."
            qkv = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
            self.layers.append(Layer(
                input_norm=vector(p + "input_layernorm.weight"),
                qkv=projection(*qkv),
                qkv_bias=mx.concatenate([vector(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
                if c.qkv_bias else None,
                o=projection(p + "self_attn.o_proj.weight"),
                post_attention_norm=vector(p + "post_attention_layernorm.weight"),
                gate_up=projection(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                down=projection(p + "mlp.down_proj.weight"),
            ))
        self.norm = vector("model.norm.weight") if self.spec.head else None
        self.lm_head = projection("lm_head.weight") if self.spec.head else None
        vectors = [a for layer in self.layers for a in (layer.input_norm, layer.post_attention_norm,
                                                        layer.qkv_bias) if a is not None]
        vectors += [self.norm] if self.norm is not None else []
        matrices = [m for proj in projections for m in proj.matrices]
        self._param_bytes = sum(m.nbytes for m in matrices) + sum(a.nbytes for a in vectors)
        mx.eval([[m.weight, m.scales, m.biases] for m in matrices], vectors)
        self._caches: dict[str, KVCache] = {}
        self._scale = c.head_dim ** -0.5

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
            steps.append(_Step(cache, it.start_pos, slice(offset, offset + it.length),
                               _causal_mask(it.start_pos, it.length)))
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
        logits = self.lm_head(mx.fast.rms_norm(picked, self.norm, c.rms_eps))
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
        outputs = [self._attend(index, q[s.rows], k[s.rows], v[s.rows], s) for s in steps]
        attn = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
        x = x + layer.o(attn)
        h = mx.fast.rms_norm(x, layer.post_attention_norm, c.rms_eps)
        gate, up = mx.split(layer.gate_up(h), 2, axis=-1)
        return x + layer.down(_silu(gate) * up)

    def _attend(self, index: int, q: mx.array, k: mx.array, v: mx.array, step: _Step) -> mx.array:
        """One session's attention over its cache: rows ``(T, n_heads * head_dim)`` in and out."""
        c = self.config
        t = q.shape[0]
        # (T, heads * dim) -> (1, heads, T, dim)
        q = q.reshape(t, c.n_heads, c.head_dim).transpose(1, 0, 2)[None]
        k = k.reshape(t, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)[None]
        v = v.reshape(t, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
        q = mx.fast.rope(q, c.head_dim, traditional=False, base=c.rope_theta, scale=1.0, offset=step.start)
        k = mx.fast.rope(k, c.head_dim, traditional=False, base=c.rope_theta, scale=1.0, offset=step.start)[0]
        cache, end = step.cache, step.start + t
        cache.keys[index][:, step.start:end, :] = k
        cache.values[index][:, step.start:end, :] = v
        keys = cache.keys[index][None, :, :end, :]
        values = cache.values[index][None, :, :end, :]
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self._scale, mask=step.mask)
        return out[0].transpose(1, 0, 2).reshape(t, c.n_heads * c.head_dim)


def _silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


def _causal_mask(start: int, length: int) -> mx.array | None:
    """Query ``i`` (position ``start + i``) sees keys ``0..start + i``; None for one query."""
    if length == 1:
        return None
    query_pos = mx.arange(start, start + length)[:, None]
    key_pos = mx.arange(start + length)[None, :]
    return key_pos <= query_pos


def load_mlx_stage(path: str | Path, spec: StageSpec, weight_mode: str = "float32") -> MLXLlamaStage:
    """Load the layers of ``spec`` from a GGUF file or HF directory onto MLX (Metal, or CPU)."""
    return MLXLlamaStage(load_weights(path, spec, weight_mode), weight_mode)
