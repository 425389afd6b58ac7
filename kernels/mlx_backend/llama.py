"""A Llama-family decoder stage (Llama, SmolLM, Mistral, Qwen2-style qkv bias) in MLX.

One readable file in the manner of mlx-lm: plain tensor code that follows the paper.

    h = x + Attention(RMSNorm(x))        # grouped-query attention, rotary positions
    y = h + MLP(RMSNorm(h))              # down(silu(gate(h)) * up(h))

Weights come from ``kernels.weights.load_weights`` with Hugging Face names and layout
(q/k rows already un-permuted), so RoPE is the "rotate half" form (``traditional=False``).

Weight modes:

- ``float32``: every matrix dequantized to float32 once, at load time.
- ``quant``: the GGUF blocks are used as they are. Q4_1 (``w = d*q + m`` per 32
  elements of a row) *is* MLX's affine 4-bit group-32 format with ``scales = d`` and
  ``biases = m``; Q4_0 is ``d*(q - 8)``, so ``biases = -8d``; Q8_0 is ``d*q`` with
  ``q`` signed, so the codes are shifted by 128 and ``biases = -128d``. Only the 4-bit
  codes are repacked into MLX's uint32 words; nothing is requantized, so the values
  are exactly the file's.

KV cache: per session and layer, preallocated buffers ``(n_kv_heads, capacity,
head_dim)`` grown in steps of ``CACHE_STEP`` positions, written in place by slice
assignment. A step's matrix products run on the rows of every item at once (one
batched decode for several 1-token items); rotary embedding, the cache write and
attention run per session, since sessions sit at different positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from kernels.config import ModelConfig
from kernels.stage import Stage, StageInputError, StageSpec, StepInput
from kernels.weights import QuantTensor, StageWeights, load_weights

CACHE_STEP = 256
GROUP = 32


@dataclass
class Matrix:
    """A ``(out, in)`` weight, float32 or affine-quantized; ``self(x)`` is ``x @ W.T``."""

    weight: mx.array  # float32 (out, in), or packed uint32 codes (out, in * bits / 32)
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int = 0  # 0: not quantized

    def __call__(self, x: mx.array) -> mx.array:
        if not self.bits:
            return x @ self.weight.T
        return mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                   group_size=GROUP, bits=self.bits)

    def rows(self, ids: mx.array) -> mx.array:
        """Rows ``ids`` as float32: an embedding lookup."""
        if not self.bits:
            return self.weight[ids]
        # Float32 scales, so the rows are d*q + m computed in float32, not rounded to float16.
        scales, biases = self.scales[ids].astype(mx.float32), self.biases[ids].astype(mx.float32)
        return mx.dequantize(self.weight[ids], scales, biases, group_size=GROUP, bits=self.bits)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.weight, self.scales, self.biases) if a is not None)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes ``(rows, cols)`` -> MLX words: element k of a word sits at bits ``k*bits``."""
    per_word = 32 // bits
    rows, cols = codes.shape
    lanes = codes.reshape(rows, cols // per_word, per_word).astype(np.uint32)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(lanes << shifts, axis=-1)


def to_matrix(t: np.ndarray | QuantTensor) -> Matrix:
    if isinstance(t, np.ndarray):
        return Matrix(mx.array(t.astype(np.float32, copy=False)))
    rows, cols = t.shape
    codes = t.qs.reshape(rows, cols)
    scale = t.scale.reshape(rows, cols // GROUP).astype(np.float16)
    if t.type_name == "Q4_1":
        bits, biases = 4, t.min.reshape(scale.shape).astype(np.float16)
    elif t.type_name == "Q4_0":
        bits, biases = 4, (scale * np.float16(-8)).astype(np.float16)
    elif t.type_name == "Q8_0":
        bits, biases = 8, (scale * np.float16(-128)).astype(np.float16)
        codes = (codes.astype(np.int16) + 128).astype(np.uint8)
    else:
        raise ValueError(f"no MLX affine form for GGUF type {t.type_name}")
    return Matrix(mx.array(_pack(codes, bits)), mx.array(scale), mx.array(biases), bits)


@dataclass
class Layer:
    input_norm: mx.array
    post_attention_norm: mx.array
    q: Matrix
    k: Matrix
    v: Matrix
    o: Matrix
    gate: Matrix
    up: Matrix
    down: Matrix
    q_bias: mx.array | None = None
    k_bias: mx.array | None = None
    v_bias: mx.array | None = None


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
    mask: mx.array | None = field(default=None)


class MLXLlamaStage(Stage):
    backend = "mlx"

    def __init__(self, weights: StageWeights, weight_mode: str) -> None:
        self.spec: StageSpec = weights.spec
        self.config: ModelConfig = weights.config
        self.weight_mode = weight_mode
        self._digest = weights.source_digest
        w = weights.tensors
        c = self.config
        matrices: dict[int, Matrix] = {}  # a tied head shares the embedding's Matrix

        def matrix(name: str) -> Matrix:
            t = w[name]
            if id(t) not in matrices:
                matrices[id(t)] = to_matrix(t)
            return matrices[id(t)]

        def vector(name: str) -> mx.array:
            return mx.array(np.asarray(w[name], dtype=np.float32))

        self.embed = matrix("model.embed_tokens.weight") if self.spec.embed else None
        self.layers: list[Layer] = []
        for i in self.spec.layers():
            p = f"model.layers.{i}."
            bias = (lambda n: vector(p + f"self_attn.{n}_proj.bias")) if c.qkv_bias else (lambda n: None)
            self.layers.append(Layer(
                input_norm=vector(p + "input_layernorm.weight"),
                post_attention_norm=vector(p + "post_attention_layernorm.weight"),
                q=matrix(p + "self_attn.q_proj.weight"), k=matrix(p + "self_attn.k_proj.weight"),
                v=matrix(p + "self_attn.v_proj.weight"), o=matrix(p + "self_attn.o_proj.weight"),
                gate=matrix(p + "mlp.gate_proj.weight"), up=matrix(p + "mlp.up_proj.weight"),
                down=matrix(p + "mlp.down_proj.weight"),
                q_bias=bias("q"), k_bias=bias("k"), v_bias=bias("v"),
            ))
        self.norm = vector("model.norm.weight") if self.spec.head else None
        self.lm_head = matrix("lm_head.weight") if self.spec.head else None
        vectors = [a for layer in self.layers for a in (layer.input_norm, layer.post_attention_norm,
                                                        layer.q_bias, layer.k_bias, layer.v_bias) if a is not None]
        vectors += [self.norm] if self.norm is not None else []
        self._param_bytes = sum(m.nbytes for m in matrices.values()) + sum(a.nbytes for a in vectors)
        mx.eval([m.weight for m in matrices.values()], vectors)
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
        rows = [s.rows if all_logits else slice(s.rows.stop - 1, s.rows.stop) for s in steps]
        picked = mx.concatenate([x[r] for r in rows], axis=0)
        logits = self.lm_head(mx.fast.rms_norm(picked, self.norm, c.rms_eps))
        mx.eval(logits)
        logits_np = np.array(logits, dtype=np.float32, copy=False)
        out, start = [], 0
        for r in rows:
            n = r.stop - r.start
            out.append(np.ascontiguousarray(logits_np[start:start + n]))
            start += n
        return out

    # -- the decoder layer -------------------------------------------------------------------

    def _layer(self, index: int, layer: Layer, x: mx.array, steps: list[_Step]) -> mx.array:
        c = self.config
        h = mx.fast.rms_norm(x, layer.input_norm, c.rms_eps)
        q, k, v = layer.q(h), layer.k(h), layer.v(h)
        if layer.q_bias is not None:
            q, k, v = q + layer.q_bias, k + layer.k_bias, v + layer.v_bias
        outputs = [self._attend(index, q[s.rows], k[s.rows], v[s.rows], s) for s in steps]
        attn = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=0)
        x = x + layer.o(attn)
        h = mx.fast.rms_norm(x, layer.post_attention_norm, c.rms_eps)
        return x + layer.down(_silu(layer.gate(h)) * layer.up(h))

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
