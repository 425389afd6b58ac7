"""The Llama-family decoder (Llama, SmolLM, Mistral, Qwen2 with qkv bias) on torch.

Per layer, as in Hugging Face's ``LlamaDecoderLayer``:

    h = x + o_proj(attn(rope(q), rope(k), v))      q, k, v = qkv_proj(rms_norm(x))
    y = h + down_proj(silu(gate_proj(n)) * up_proj(n))      n = rms_norm(h)

q/k/v and gate/up are fused into one matmul each. RoPE uses HF's ``rotate_half``
convention (the halves of each head are the pairs), written as
``x*cos + roll(x, d/2)*sin_signed`` with ``sin_signed = [-sin, sin]``, which is the
same arithmetic. Attention is grouped-query (``enable_gqa``) over the stage's
slot-pool KV cache; a batched decode step reads each session's slot padded to the
longest one and masks the padding, except in the quant mode, where each session
attends over its own positions so that its result does not depend on the batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass
class Layer:
    attn_norm: torch.Tensor
    qkv: Linear
    o: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear
    down: Linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm, op for op (float32 throughout)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_tables(config: ModelConfig, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, ``(n_positions, head_dim)`` float32, computed as HF does."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.arange(n_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    sign = torch.cat([-torch.ones(d // 2), torch.ones(d // 2)])
    return emb.cos().contiguous(), (emb.sin() * sign).contiguous()


class _Prefill:
    """Attention context of one session's multi-token step starting at ``start``."""

    def __init__(self, cache: KVCache, slot: int, start: int, n: int):
        self.cache, self.slot, self.start, self.n = cache, slot, start, n
        end = start + n
        self.mask = None
        if start > 0 and n > 1:
            rows = torch.arange(start, end)[:, None]
            self.mask = torch.arange(end)[None, :] <= rows

    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, e = self.start, self.start + self.n
        ck, cv = self.cache.k[li, self.slot], self.cache.v[li, self.slot]
        ck[:, s:e] = k.transpose(0, 1)
        cv[:, s:e] = v.transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], ck[None, :, :e], cv[None, :, :e], attn_mask=self.mask,
            is_causal=self.start == 0 and self.n > 1, enable_gqa=True)
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
        self.cache = cache
        self.slot_list, self.pos_list = slots, positions
        self.slots = torch.tensor(slots)
        self.pos = torch.tensor(positions)
        self.padded = len(slots) > 1 and not exact
        self.length = max(positions) + 1
        self.groups = config.n_heads // config.n_kv_heads
        self.scale = config.head_dim ** -0.5
        self.mask = None
        if self.padded:
            pad = torch.arange(self.length)[None, :] > self.pos[:, None]
            self.mask = pad[:, None, None, :]  # (B, 1, 1, L): True where padding

    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
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
            return self._attend(q, keys, values, self.mask)
        outs = [self._attend(q[i:i + 1], ck[slot:slot + 1, :, :pos + 1], cv[slot:slot + 1, :, :pos + 1])
                for i, (slot, pos) in enumerate(zip(self.slot_list, self.pos_list, strict=True))]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n_kv, _, hd = keys.shape
        qg = q.reshape(b, n_kv, self.groups, hd)
        scores = torch.matmul(qg, keys.transpose(-1, -2)) * self.scale  # (B, kv, groups, L)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, kv, groups, hd)
        return out.reshape(b, -1)


class TorchLlamaStage(Stage):
    backend = "torch"

    def __init__(self, weights: StageWeights, weight_mode: str):
        self.config: ModelConfig = weights.config
        self.spec: StageSpec = weights.spec
        self.weight_mode = weight_mode
        self._digest = weights.source_digest
        c, t = self.config, weights.tensors
        self._q_dim, self._kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        self.layers: list[Layer] = []
        for i in self.spec.layers():
            p = f"model.layers.{i}."
            names = ("q_proj", "k_proj", "v_proj")
            biases = [t[f"{p}self_attn.{n}.bias"] for n in names] if c.qkv_bias else None
            self.layers.append(Layer(
                attn_norm=torch.from_numpy(t[p + "input_layernorm.weight"]),
                qkv=make_linear([t[f"{p}self_attn.{n}.weight"] for n in names], biases, weight_mode),
                o=make_linear([t[p + "self_attn.o_proj.weight"]], None, weight_mode),
                mlp_norm=torch.from_numpy(t[p + "post_attention_layernorm.weight"]),
                gate_up=make_linear([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]],
                                    None, weight_mode),
                down=make_linear([t[p + "mlp.down_proj.weight"]], None, weight_mode),
            ))
        self._embed = None
        if self.spec.embed:
            e = t["model.embed_tokens.weight"]
            self._embed = QuantEmbedding(e) if isinstance(e, QuantTensor) else torch.from_numpy(e)
        self._norm = self._lm_head = None
        self._head_shares_embed = False
        if self.spec.head:
            self._norm = torch.from_numpy(t["model.norm.weight"])
            head = t["lm_head.weight"]
            if weight_mode == "float32" and self.spec.embed and head is t["model.embed_tokens.weight"]:
                self._lm_head = DenseLinear.sharing(self._embed)
                self._head_shares_embed = True
            else:
                self._lm_head = make_head(head, weight_mode)
        n_pos = c.context_length
        self._cos, self._sin = rope_tables(c, n_pos)
        self.cache = KVCache(len(self.layers), c.n_kv_heads, c.head_dim, n_pos)

    # -- Stage interface -------------------------------------------------------------

    @property
    def weights_digest(self) -> bytes:
        return self._digest

    @property
    def param_bytes(self) -> int:
        total = 0
        for layer in self.layers:
            total += layer.attn_norm.nbytes + layer.mlp_norm.nbytes
            total += sum(lin.nbytes for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
        for x in (self._embed, self._norm):
            total += 0 if x is None else x.nbytes
        if self._lm_head is not None and not self._head_shares_embed:
            total += self._lm_head.nbytes
        return total

    @property
    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads: all but the embedding table (one row is
        read), unless the table is also the head's matrix."""
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
                ctx = _Prefill(self.cache, slot, it.start_pos, it.length)
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
            return self._embed[ids].float()
        return torch.from_numpy(np.ascontiguousarray(it.hidden, dtype=np.float32))

    def _output(self, x: torch.Tensor, rows: list[int]) -> np.ndarray:
        if not self.spec.head:
            return x.numpy().copy()
        if rows != list(range(x.shape[0])):
            x = x[rows[0]:rows[0] + 1] if len(rows) == 1 else x[torch.tensor(rows)]
        x = rms_norm(x, self._norm, self.config.rms_eps)
        return self._lm_head(x).numpy()

    def _run(self, x: torch.Tensor, pos: torch.Tensor, ctx: _Prefill | _Decode) -> torch.Tensor:
        c = self.config
        n, hd, eps = x.shape[0], c.head_dim, c.rms_eps
        qk_dim = self._q_dim + self._kv_dim
        cos, sin = self._cos[pos][:, None, :], self._sin[pos][:, None, :]
        for li, layer in enumerate(self.layers):
            qkv = layer.qkv(rms_norm(x, layer.attn_norm, eps))
            qk = qkv[:, :qk_dim].view(n, -1, hd)
            qk = qk * cos + torch.roll(qk, hd // 2, dims=-1) * sin
            q, k = qk[:, :c.n_heads], qk[:, c.n_heads:]
            v = qkv[:, qk_dim:].view(n, c.n_kv_heads, hd)
            x = x + layer.o(ctx.attend(li, q, k, v))
            gu = layer.gate_up(rms_norm(x, layer.mlp_norm, eps))
            g, u = gu.split(gu.shape[-1] // 2, dim=-1)
            x = x + layer.down(F.silu(g) * u)
        return x


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


def load_llama_stage(path: str | Path, spec: StageSpec, weight_mode: str) -> TorchLlamaStage:
    set_default_threads()
    return TorchLlamaStage(load_weights(path, spec, weight_mode), weight_mode)
