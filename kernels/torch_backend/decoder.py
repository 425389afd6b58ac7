"""The decoder of every architecture kernels runs (Llama, Mistral, Qwen2/3, Qwen3-MoE, Gemma 3) on torch.

One layer, with the per-architecture differences named as ``ModelConfig`` fields
(see kernels/config.py)::

    n = norm(x)                                         input_layernorm
    q, k, v = qkv_proj(n)                               (+ bias: qwen2)
    q, k = norm(q), norm(k)  per head                   qk_norm: qwen3, qwen3moe, gemma3
    a = o_proj(attn(rope(q), rope(k), v))               a sliding window on some layers: gemma3
    x = x + post_norm(a)                                post_norm only with sandwich_norms: gemma3
    y = mlp(norm(x))         down(act(gate(n)) * up(n)) act: silu, or gelu_tanh (gemma3)
                             or a routed sum of top-k expert MLPs (qwen3moe)
    x = x + post_norm(y)

plus ``embed_scale`` on the embeddings and ``final_logit_softcap`` on the logits (gemma3).

q/k/v and gate/up are fused into one matmul each. RoPE uses HF's ``rotate_half``
convention (the halves of each head are the pairs), written as
``x*cos + roll(x, d/2)*sin_signed`` with ``sin_signed = [-sin, sin]``, which is the
same arithmetic; each layer takes the tables of its own base (gemma3's sliding
layers use a local one). Attention is grouped-query (``enable_gqa``) over the stage's
slot-pool KV cache; a batched decode step reads each session's slot padded to the
longest one and masks the padding, except in the quant mode, where each session
attends over its own positions so that its result does not depend on the batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kernels.config import ModelConfig
from kernels.stage import Stage, StageSpec, StepInput, output_rows
from kernels.torch_backend.cache import KVCache
from kernels.torch_backend.linear import (
    DenseLinear,
    Linear,
    QuantEmbedding,
    make_head,
    make_linear,
)
from kernels.weights import QuantTensor, StageWeights, load_weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm, op for op (float32 throughout)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)``: Gemma's soft limit on logits (no-op for cap 0)."""
    return x if not cap else torch.tanh(x / cap) * cap


class Rope:
    """cos and signed sin tables ``(positions, head_dim)`` float32 for one RoPE base, as HF
    computes them; grown by doubling when a step reaches past them."""

    def __init__(self, base: float, head_dim: int, n_positions: int = 1024):
        self.base, self.head_dim = base, head_dim
        self.cos = self.sin = torch.empty(0, head_dim)
        self._build(n_positions)

    def _build(self, n: int) -> None:
        d = self.head_dim
        inv_freq = 1.0 / (self.base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        sign = torch.cat([-torch.ones(d // 2), torch.ones(d // 2)])
        self.cos, self.sin = emb.cos().contiguous(), (emb.sin() * sign).contiguous()

    def tables(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(len(pos), 1, head_dim)`` cos and signed sin, to broadcast over heads."""
        last = int(pos.max())
        if last >= self.cos.shape[0]:
            n = self.cos.shape[0]
            while n <= last:
                n *= 2
            self._build(n)
        return self.cos[pos][:, None, :], self.sin[pos][:, None, :]


@dataclass
class MLP:
    gate_up: Linear  # gate | up rows stacked
    down: Linear


@dataclass
class RoutedMLP:
    """Top-k of ``n_experts`` MLPs per token, weighted by the router's softmax (qwen3moe)."""

    router: torch.Tensor  # (n_experts, hidden), float32
    experts: list[MLP]


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    mlp_norm: torch.Tensor
    mlp: MLP | RoutedMLP
    qk_norm: torch.Tensor | None = None  # (n_heads + n_kv_heads, head_dim): q's weight per q head, then k's
    post_attn_norm: torch.Tensor | None = None
    post_mlp_norm: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        total = 0
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                total += value.nbytes
        mlps = self.mlp.experts if isinstance(self.mlp, RoutedMLP) else [self.mlp]
        total += self.mlp.router.nbytes if isinstance(self.mlp, RoutedMLP) else 0
        total += sum(m.gate_up.nbytes + m.down.nbytes for m in mlps)
        return total + self.qkv.nbytes + self.o.nbytes


def _float(w: np.ndarray | QuantTensor) -> np.ndarray:
    """A stack of experts ``(n_experts, out, in)`` as float32: each expert's matrix is then
    cast in the weight mode's format on its own (int8 rows in the quant mode)."""
    return w.dequantize() if isinstance(w, QuantTensor) else w


def _norm_weight(w: np.ndarray, config: ModelConfig) -> torch.Tensor:
    """An RMSNorm's multiplier: ``norm_offset + w`` (Gemma's ``1 + w``), float32."""
    w = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return w + config.norm_offset if config.norm_offset else w


def _activation(name: str):
    if name == "gelu_tanh":
        return lambda g: F.gelu(g, approximate="tanh")
    return F.silu


class _Prefill:
    """Attention context of one session's multi-token step starting at ``start``."""

    def __init__(self, cache: KVCache, slot: int, start: int, n: int, config: ModelConfig):
        self.cache, self.slot, self.start, self.n = cache, slot, start, n
        self.config = config
        self._masks: dict[int, tuple[int, torch.Tensor | None]] = {}

    def _mask(self, window: int) -> tuple[int, torch.Tensor | None]:
        """The first key position a query of this step may see, and the mask from it
        (None where plain causal attention from position 0 is exact)."""
        if window not in self._masks:
            s, e = self.start, self.start + self.n
            lo = max(0, s - window + 1) if window else 0
            if lo == 0 and s == 0 and (not window or window >= self.n):
                self._masks[window] = (0, None)
            else:
                rows = torch.arange(s, e)[:, None]
                keys = torch.arange(lo, e)[None, :]
                allowed = keys <= rows
                if window:
                    allowed &= keys > rows - window
                self._masks[window] = (lo, allowed)
        return self._masks[window]

    def attend(self, li: int, window: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.config
        s, e = self.start, self.start + self.n
        ck, cv = self.cache.k[li, self.slot], self.cache.v[li, self.slot]
        ck[:, s:e] = k.transpose(0, 1)
        cv[:, s:e] = v.transpose(0, 1)
        lo, allowed = self._mask(window)
        keys, values = ck[None, :, lo:e], cv[None, :, lo:e]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys, values, attn_mask=allowed,
            is_causal=allowed is None, scale=c.attn_scale, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(self.n, -1)


class _Decode:
    """Attention context of a batched decode step: one new token per session.

    Written out (not SDPA): for a single query per session, two small matmuls over
    the grouped heads cost far less per call than the fused kernel's set-up.

    ``exact``: each session attends over exactly its own positions, with the same
    operations as when it decodes alone, so its result does not depend on which other
    sessions shared the step and an auditor re-running it alone reproduces it bit for
    bit. The quant mode needs this: padding a batch to its longest session changes the
    reduction lengths and so the float32 rounding, which its bfloat16 activations
    amplify (measured on an AVX2 CPU: logits moved by up to 0.25, relative L2 6.8e-3,
    more than the bfloat16 audit class tolerates). float32 stages keep one padded,
    masked batch (differences ~1e-7; about 10% faster at 8 sessions, measured).
    """

    def __init__(self, cache: KVCache, slots: list[int], positions: list[int], config: ModelConfig,
                 exact: bool = False):
        self.cache, self.config = cache, config
        self.slot_list, self.pos_list = slots, positions
        self.slots = torch.tensor(slots)
        self.pos = torch.tensor(positions)
        self.padded = len(slots) > 1 and not exact
        self.length = max(positions) + 1
        self.groups = config.n_heads // config.n_kv_heads
        self._masks: dict[int, torch.Tensor] = {}

    def _mask(self, window: int) -> torch.Tensor:
        """``(B, 1, 1, L)``: True where a session's key is visible (padded batches)."""
        if window not in self._masks:
            keys = torch.arange(self.length)[None, :]
            allowed = keys <= self.pos[:, None]
            if window:
                allowed &= keys > self.pos[:, None] - window
            self._masks[window] = allowed[:, None, None, :]
        return self._masks[window]

    def attend(self, li: int, window: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ck, cv = self.cache.k[li], self.cache.v[li]
        if len(self.slot_list) == 1:
            ck[self.slot_list[0], :, self.pos_list[0]] = k[0]
            cv[self.slot_list[0], :, self.pos_list[0]] = v[0]
        else:
            ck[self.slots, :, self.pos] = k
            cv[self.slots, :, self.pos] = v
        if self.padded:
            keys = torch.index_select(ck[:, :, :self.length], 0, self.slots)
            values = torch.index_select(cv[:, :, :self.length], 0, self.slots)
            return self._attend(q, keys, values, self._mask(window))
        outs = []
        for i, (slot, pos) in enumerate(zip(self.slot_list, self.pos_list, strict=True)):
            lo = max(0, pos - window + 1) if window else 0
            outs.append(self._attend(q[i:i + 1], ck[slot:slot + 1, :, lo:pos + 1], cv[slot:slot + 1, :, lo:pos + 1]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
        b, n_kv, _, hd = keys.shape
        qg = q.reshape(b, n_kv, self.groups, hd)
        scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.config.attn_scale  # (B, kv, groups, L)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, kv, groups, hd)
        return out.reshape(b, -1)


class TorchDecoderStage(Stage):
    backend = "torch"

    def __init__(self, weights: StageWeights, weight_mode: str):
        self.config: ModelConfig = weights.config
        self.spec: StageSpec = weights.spec
        self.weight_mode = weight_mode
        self._digest = weights.source_digest
        c = self.config
        self._q_dim, self._kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self.layers: list[Layer] = [self._layer(weights.tensors, i) for i in self.spec.layers()]
        self._windows = [c.window(i) for i in self.spec.layers()]
        ropes = {base: Rope(base, c.head_dim) for base in {c.rope_base(i) for i in self.spec.layers()}}
        self._ropes = [ropes[c.rope_base(i)] for i in self.spec.layers()]
        self._act = _activation(c.activation)
        t = weights.tensors
        self._embed = None
        if self.spec.embed:
            e = t["model.embed_tokens.weight"]
            self._embed = QuantEmbedding(e) if isinstance(e, QuantTensor) else torch.from_numpy(e)
        self._norm = self._lm_head = None
        self._head_shares_embed = False
        if self.spec.head:
            self._norm = _norm_weight(t["model.norm.weight"], self.config)
            head = t["lm_head.weight"]
            if weight_mode == "float32" and self.spec.embed and head is t["model.embed_tokens.weight"]:
                self._lm_head = DenseLinear.sharing(self._embed)
                self._head_shares_embed = True
            else:
                self._lm_head = make_head(head, weight_mode)
        self.cache = KVCache(len(self.layers), c.n_kv_heads, c.head_dim, c.context_length)

    def _layer(self, t: dict, i: int) -> Layer:
        c, mode = self.config, self.weight_mode
        p = f"model.layers.{i}."

        def vector(name: str) -> torch.Tensor | None:
            return _norm_weight(t[p + name], c) if p + name in t else None

        names = ("q_proj", "k_proj", "v_proj")
        biases = [t[f"{p}self_attn.{n}.bias"] for n in names] if c.qkv_bias else None
        if c.moe:
            gate, up, down = (_float(t[f"{p}mlp.experts.{n}_proj.weight"]) for n in ("gate", "up", "down"))
            mlp: MLP | RoutedMLP = RoutedMLP(
                router=torch.from_numpy(np.ascontiguousarray(t[p + "mlp.gate.weight"], dtype=np.float32)),
                experts=[MLP(make_linear([gate[e], up[e]], None, mode), make_linear([down[e]], None, mode))
                         for e in range(c.n_experts)])
        else:
            mlp = MLP(make_linear([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]], None, mode),
                      make_linear([t[p + "mlp.down_proj.weight"]], None, mode))
        sandwich = c.sandwich_norms
        return Layer(
            attn_norm=vector("input_layernorm.weight"),
            qkv=make_linear([t[f"{p}self_attn.{n}.weight"] for n in names], biases, mode),
            o=make_linear([t[p + "self_attn.o_proj.weight"]], None, mode),
            mlp_norm=vector("pre_feedforward_layernorm.weight" if sandwich else "post_attention_layernorm.weight"),
            mlp=mlp,
            qk_norm=torch.cat([vector("self_attn.q_norm.weight").expand(c.n_heads, -1),
                               vector("self_attn.k_norm.weight").expand(c.n_kv_heads, -1)]) if c.qk_norm else None,
            post_attn_norm=vector("post_attention_layernorm.weight") if sandwich else None,
            post_mlp_norm=vector("post_feedforward_layernorm.weight"),
        )

    # -- Stage interface -------------------------------------------------------------

    @property
    def weights_digest(self) -> bytes:
        return self._digest

    @property
    def param_bytes(self) -> int:
        total = sum(layer.nbytes for layer in self.layers)
        for x in (self._embed, self._norm):
            total += 0 if x is None else x.nbytes
        if self._lm_head is not None and not self._head_shares_embed:
            total += self._lm_head.nbytes
        return total

    @property
    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads: all but the embedding table (one row is
        read), unless the table is also the head's matrix. (A routed MLP reads only the
        chosen experts: this counts them all.)"""
        total = self.param_bytes
        if self._embed is not None and not self._head_shares_embed:
            total -= self._embed.nbytes
        return total

    def cache_len(self, session: str) -> int:
        return self.cache.cache_len(session)

    def free(self, session: str) -> None:
        self.cache.free(session)

    @torch.inference_mode()
    def forward(self, items: list[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        self.check_items(items)
        out: list[np.ndarray | None] = [None] * len(items)
        decode = [i for i, it in enumerate(items) if it.length == 1]
        for i, it in enumerate(items):
            if it.length > 1:
                slot = self.cache.reserve(it.session, it.start_pos, it.length)
                ctx = _Prefill(self.cache, slot, it.start_pos, it.length, self.config)
                pos = torch.arange(it.start_pos, it.start_pos + it.length)
                x = self._run(self._input(it), pos, ctx)
                out[i] = self._output(x, output_rows(it, all_logits))
        if decode:
            batch = [items[i] for i in decode]
            slots = [self.cache.reserve(it.session, it.start_pos, 1) for it in batch]
            positions = [it.start_pos for it in batch]
            ctx = _Decode(self.cache, slots, positions, self.config, exact=self.weight_mode == "quant")
            x = torch.cat([self._input(it) for it in batch]) if len(batch) > 1 else self._input(batch[0])
            y = self._run(x, ctx.pos, ctx)
            for row, i in enumerate(decode):
                out[i] = self._output(y[row:row + 1], output_rows(items[i], all_logits))
        return out  # type: ignore[return-value]

    # -- model math ------------------------------------------------------------------

    def _input(self, it: StepInput) -> torch.Tensor:
        if self.spec.embed:
            ids = torch.from_numpy(np.asarray(it.tokens, dtype=np.int64))
            rows = self._embed[ids].float()
            return rows * self.config.embed_scale if self.config.embed_scale != 1.0 else rows
        return torch.from_numpy(np.ascontiguousarray(it.hidden, dtype=np.float32))

    def _output(self, x: torch.Tensor, rows: list[int]) -> np.ndarray:
        if not self.spec.head:
            return x.numpy().copy()
        if rows != list(range(x.shape[0])):
            x = x[rows[0]:rows[0] + 1] if len(rows) == 1 else x[torch.tensor(rows)]
        x = rms_norm(x, self._norm, self.config.rms_eps)
        return softcap(self._lm_head(x), self.config.final_logit_softcap).numpy()

    def _run(self, x: torch.Tensor, pos: torch.Tensor, ctx: _Prefill | _Decode) -> torch.Tensor:
        c = self.config
        n, hd, eps = x.shape[0], c.head_dim, c.rms_eps
        qk_dim = self._q_dim + self._kv_dim
        tables = {id(r): r.tables(pos) for r in self._ropes}
        for li, layer in enumerate(self.layers):
            qkv = layer.qkv(rms_norm(x, layer.attn_norm, eps))
            qk = qkv[:, :qk_dim].view(n, -1, hd)  # q heads, then k heads: normed and rotated at once
            if layer.qk_norm is not None:
                qk = rms_norm(qk, layer.qk_norm, eps)
            cos, sin = tables[id(self._ropes[li])]
            qk = qk * cos + torch.roll(qk, hd // 2, dims=-1) * sin
            q, k = qk[:, :c.n_heads], qk[:, c.n_heads:]
            v = qkv[:, qk_dim:].view(n, c.n_kv_heads, hd)
            a = layer.o(ctx.attend(li, self._windows[li], q, k, v))
            x = x + (a if layer.post_attn_norm is None else rms_norm(a, layer.post_attn_norm, eps))
            h = rms_norm(x, layer.mlp_norm, eps)
            y = self._routed(layer.mlp, h) if isinstance(layer.mlp, RoutedMLP) else self._mlp(layer.mlp, h)
            x = x + (y if layer.post_mlp_norm is None else rms_norm(y, layer.post_mlp_norm, eps))
        return x

    def _mlp(self, mlp: MLP, h: torch.Tensor) -> torch.Tensor:
        gu = mlp.gate_up(h)
        g, u = gu.split(gu.shape[-1] // 2, dim=-1)
        return mlp.down(self._act(g) * u)

    def _routed(self, mlp: RoutedMLP, h: torch.Tensor) -> torch.Tensor:
        """Softmax over the router's logits, the top ``n_experts_used`` per token (renormalized
        to sum 1 when the config says so), each chosen expert run on the tokens that chose it."""
        c = self.config
        probs = torch.softmax(F.linear(h, mlp.router), dim=-1)
        weight, chosen = torch.topk(probs, c.n_experts_used, dim=-1)
        if c.expert_weights_norm:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(h)
        for e in torch.unique(chosen).tolist():
            rows, rank = torch.nonzero(chosen == e, as_tuple=True)
            y = self._mlp(mlp.experts[e], h[rows])
            out.index_add_(0, rows, y * weight[rows, rank, None])
        return out


def set_default_threads() -> None:
    """MESH_TORCH_THREADS if set, else half the cores (at least one).

    Decode is a chain of small matrix-vector products bound by memory bandwidth,
    which few threads saturate; with every core busy, OpenMP's barriers wait on
    descheduled threads and a step gets several times slower (measured: 76 ms vs
    368 ms per token on a shared 2-core machine). Half leaves room for the event
    loop, the network and other processes.
    """
    n = os.environ.get("MESH_TORCH_THREADS")
    torch.set_num_threads(int(n) if n else max(1, (os.cpu_count() or 2) // 2))


def load_decoder_stage(path: str | Path, spec: StageSpec, weight_mode: str) -> TorchDecoderStage:
    set_default_threads()
    return TorchDecoderStage(load_weights(path, spec, weight_mode), weight_mode)
