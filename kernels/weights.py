"""Load only the tensors of one stage, with Hugging Face names, from GGUF or safetensors.

``load_weights(path, spec, mode)`` returns a ``StageWeights`` whose ``tensors`` maps
HF names to either

- ``np.ndarray`` float32 (norms, biases, float matrices, and every matrix in
  ``mode="float32"``, dequantized by the gguf library), or
- ``QuantTensor`` (``mode="quant"``, a GGUF matrix stored in any block type): the
  file's bytes for it, untouched, so a backend maps them onto its own quantized format
  (``kernels.blocks`` re-expresses the group-32 types exactly) or dequantizes them.

Names present for a stage ``[a, b)``: every ``blk.{i}.*`` tensor of the file for i in
[a, b), renamed by ``_LAYER_NAMES`` (``model.layers.{i}.self_attn.q_proj.weight``, ...;
MoE experts stay stacked, ``(experts, out, in)``, as ``mlp.experts.{gate,up,down}_proj.weight``);
``model.embed_tokens.weight`` if ``spec.embed``; ``model.norm.weight`` and ``lm_head.weight``
if ``spec.head`` (with tied embeddings ``lm_head.weight`` is the token embedding; if the
stage also embeds, both names refer to the same object).

Layout is Hugging Face's: matrices are ``(out_features, in_features)``; GGUF q/k rows are
un-permuted for the Llama-style converters (llama.cpp permutes them for its rope kernel;
see transformers' ``reverse_permute_weights``). Norm weights are the file's: Gemma's are
stored as ``1 + w`` (llama.cpp's converter adds the one HF's ``Gemma3RMSNorm`` adds at
run time), so a backend multiplies by them as they are. Tensors of other layers are never read: the files are
memory-mapped and only the needed byte ranges are touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import blake3
import numpy as np

from kernels.config import (
    ModelConfig,
    UnsupportedModel,
    config_from_gguf,
    config_from_hf_dir,
)
from kernels.gguf import GGUFFile, dequantize, open_gguf
from kernels.safetensors import SafetensorsDir
from kernels.stage import WEIGHT_MODES, StageSpec

_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")

# GGUF per-layer tensor suffix -> HF suffix (under model.layers.{i}.)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",  # the MoE router
    "ffn_gate_exps.weight": "mlp.experts.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj.weight",
}
# where an architecture names a tensor differently
_ARCH_LAYER_NAMES = {
    "gemma3": {
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    },
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


@dataclass
class QuantTensor:
    """A GGUF block-quantized matrix, kept as the file's bytes.

    ``shape`` is numpy order, ``(rows, cols)`` (or ``(experts, rows, cols)``); ``raw`` is
    uint8 ``(prod(shape[:-1]), row_bytes)``: each row is ``cols / block`` blocks of
    ``type_name``, so rows can be stacked or permuted without decoding them.
    """

    type_name: str
    shape: tuple[int, ...]
    raw: np.ndarray

    def dequantize(self) -> np.ndarray:
        """float32 of ``shape``, by the gguf library."""
        return dequantize(self.raw, self.type_name, self.shape)

    def affine(self):
        """The matrix as exact group-32 affine codes (``kernels.blocks``); ValueError if
        the type has none."""
        from kernels.blocks import decode

        rows = int(np.prod(self.shape[:-1]))
        return decode(self.raw, self.type_name, rows, self.shape[-1])

    def held(self):
        """The matrix as the group-32 affine codes a quant-mode MLX stage holds
        (``kernels.blocks``): the file's own codes where the type has that form, else its
        values requantized to 8 bits."""
        from kernels.blocks import AFFINE_BITS, requantize

        if self.type_name in AFFINE_BITS:
            return self.affine()
        return requantize(self.dequantize().reshape(-1, self.shape[-1]))

    def held_values(self) -> np.ndarray:
        """float32 of ``shape``: exactly the values a quant-mode MLX stage multiplies by."""
        return self.held().dequantize().reshape(self.shape)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of a matrix as float32 (an embedding lookup): only their blocks
        are decoded."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return dequantize(self.raw[ids], self.type_name, (len(ids), self.shape[-1]))

    def __getitem__(self, expert: int) -> QuantTensor:
        """Expert ``expert`` of a stacked ``(experts, rows, cols)`` tensor, its own blocks."""
        if len(self.shape) != 3:
            raise TypeError("only a stacked (experts, rows, cols) QuantTensor is indexed")
        rows = self.shape[1]
        return QuantTensor(self.type_name, self.shape[1:], self.raw[expert * rows:(expert + 1) * rows])

    @property
    def nbytes(self) -> int:
        """Bytes as stored in the file."""
        return self.raw.nbytes


def stack_rows(parts: list[QuantTensor]) -> QuantTensor:
    """Matrices of one type stacked along their rows (fusing q/k/v or gate/up)."""
    first = parts[0]
    if any(p.type_name != first.type_name or p.shape[1:] != first.shape[1:] for p in parts):
        raise ValueError("stack_rows needs matrices of one type and row length")
    return QuantTensor(first.type_name, (sum(p.shape[0] for p in parts), *first.shape[1:]),
                       np.concatenate([p.raw for p in parts]))


Tensor = np.ndarray | QuantTensor


@dataclass
class StageWeights:
    config: ModelConfig
    spec: StageSpec
    tensors: dict[str, Tensor]
    source_digest: bytes = field(repr=False, default=b"")
    source_bytes: dict[int, int] = field(repr=False, default_factory=dict)  # id(tensor) -> its bytes in the file

    def n_params(self) -> int:
        """Parameters held, counting a tied embedding/head shared object once."""
        return sum(int(np.prod(t.shape)) for t in self._distinct())

    def file_bytes(self) -> int:
        """Bytes of the source tensors in the file (a tied embedding/head counted once)."""
        return sum(self.source_bytes.get(id(t), 0) for t in self._distinct())

    def held_by_mlx_quant(self) -> "StageWeights":
        """The same stage as float32 matrices of exactly the values a quant-mode MLX stage
        holds (`QuantTensor.held_values`): what a float32 auditor of such a stage re-runs
        with. A tied embedding and head stay one tensor."""
        done: dict[int, Tensor] = {}
        tensors: dict[str, Tensor] = {}
        source_bytes: dict[int, int] = {}
        for hf, t in self.tensors.items():
            if id(t) not in done:
                new = t.held_values() if isinstance(t, QuantTensor) else t
                done[id(t)] = new
                source_bytes[id(new)] = self.source_bytes.get(id(t), 0)
            tensors[hf] = done[id(t)]
        return StageWeights(self.config, self.spec, tensors, self.source_digest, source_bytes)

    def _distinct(self) -> list[Tensor]:
        seen: dict[int, Tensor] = {}
        for t in self.tensors.values():
            seen.setdefault(id(t), t)
        return list(seen.values())


def load_weights(path: str | Path, spec: StageSpec, mode: str = "float32") -> StageWeights:
    """Read the tensors of ``spec`` from a ``.gguf`` file or an HF directory."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"mode {mode!r}: use one of {WEIGHT_MODES}")
    path = Path(path)
    if path.is_dir():
        return _load_safetensors(path, spec)
    return _load_gguf(path, spec, mode)


def gguf_names(gf: GGUFFile, config: ModelConfig, spec: StageSpec) -> dict[str, str]:
    """HF name -> GGUF tensor name for every tensor the stage holds."""
    names: dict[str, str] = {}
    if spec.embed:
        names["model.embed_tokens.weight"] = "token_embd.weight"
    table = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES.get(config.arch, {})}
    wanted = {f"blk.{i}." for i in spec.layers()}
    for src in gf.tensors:
        if not src.startswith("blk."):
            continue
        prefix, _, suffix = src.partition(".")[2].partition(".")
        if f"blk.{prefix}." not in wanted:
            continue
        if suffix not in table:
            raise UnsupportedModel(f"{gf.path}: tensor {src} has no known role in a {config.arch} layer; "
                                   "this GGUF's layout is not supported")
        names[f"model.layers.{prefix}.{table[suffix]}"] = src
    if spec.head:
        names["model.norm.weight"] = "output_norm.weight"
        names["lm_head.weight"] = "token_embd.weight" if config.tie_embeddings else "output.weight"
    for hf, src in names.items():
        if src not in gf.tensors:
            raise UnsupportedModel(f"{gf.path}: tensor {src} (for {hf}) is missing from the GGUF file")
    return names


def _unpermute(x: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rows are the first axis)."""
    dim = x.shape[0] // n_head // 2
    return x.reshape(n_head, dim, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _permute_heads(hf: str, config: ModelConfig) -> int | None:
    if config.arch not in ("llama", "mistral"):
        return None  # llama.cpp permutes q/k only for Llama-style converters
    if ".self_attn.q_proj." in hf:
        return config.n_heads
    if ".self_attn.k_proj." in hf:
        return config.n_kv_heads
    return None


def _load_gguf(path: Path, spec: StageSpec, mode: str) -> StageWeights:
    gf = open_gguf(path)
    config = config_from_gguf(gf)
    spec.validate(config)
    names = gguf_names(gf, config, spec)
    for src in set(names.values()):  # fail before reading anything
        gf.check_type(src)
    digest = blake3.blake3()
    digest.update(f"{spec.start}:{spec.end}:{int(spec.embed)}:{int(spec.head)}|".encode())
    tensors: dict[str, Tensor] = {}
    by_source: dict[str, Tensor] = {}
    source_bytes: dict[int, int] = {}
    for hf in sorted(names, key=_digest_order):
        src = names[hf]
        if src in by_source:  # tied head reuses the embedding already loaded
            tensors[hf] = by_source[src]
            continue
        info = gf.tensors[src]
        raw = gf.raw(src)
        digest.update(f"{hf}|{info.type_name}|{info.shape}|".encode())
        digest.update(memoryview(np.ascontiguousarray(raw)).cast("B"))
        n_head = _permute_heads(hf, config)
        if mode == "quant" and info.type_name not in _FLOAT_TYPES and len(info.shape) >= 2:
            rows = raw.reshape(-1, raw.shape[-1])
            t: Tensor = QuantTensor(info.type_name, info.shape,
                                    np.ascontiguousarray(_unpermute(rows, n_head) if n_head else rows))
        else:
            t = gf.dequantize(src)
            if n_head:
                t = np.ascontiguousarray(_unpermute(t, n_head))
        tensors[hf] = by_source[src] = t
        source_bytes[id(t)] = info.nbytes
    return StageWeights(config, spec, tensors, digest.digest(), source_bytes)


def _digest_order(hf: str) -> tuple:
    """Embedding, layers in order, then the head: the order the digest has always used."""
    if hf == "model.embed_tokens.weight":
        return (0, 0, "")
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        return (1, int(i), _LAYER_ORDER.get(rest, len(_LAYER_ORDER)), rest)
    return (2, 0 if hf == "model.norm.weight" else 1, "")


_LAYER_ORDER = {hf: n for n, hf in enumerate(dict.fromkeys(
    ["input_layernorm.weight", "post_attention_layernorm.weight"]
    + [v for k, v in _LAYER_NAMES.items() if k not in ("attn_norm.weight", "ffn_norm.weight")]))}


def _load_safetensors(directory: Path, spec: StageSpec) -> StageWeights:
    st = SafetensorsDir(directory)
    config = config_from_hf_dir(directory)
    spec.validate(config)
    digest = blake3.blake3()
    digest.update(f"{spec.start}:{spec.end}:{int(spec.embed)}:{int(spec.head)}|".encode())
    wanted = {f"model.layers.{i}." for i in spec.layers()}
    names = [n for n in st.tensors if n.startswith("model.layers.") and ".".join(n.split(".")[:3]) + "." in wanted]
    if spec.embed:
        names.insert(0, "model.embed_tokens.weight")
    if spec.head:
        names += ["model.norm.weight", "lm_head.weight"]
    tensors: dict[str, Tensor] = {}
    source_bytes: dict[int, int] = {}
    for hf in sorted(names, key=_digest_order):
        src = hf
        if hf == "lm_head.weight" and (config.tie_embeddings or hf not in st.tensors):
            src = "model.embed_tokens.weight"
            if src in tensors:
                tensors[hf] = tensors[src]
                continue
        if src not in st.tensors:
            raise ValueError(f"{directory}: tensor {src} is missing from the safetensors files")
        info = st.tensors[src]
        digest.update(f"{hf}|{info.dtype}|{info.shape}|".encode())
        digest.update(memoryview(st.raw(src)))
        tensors[hf] = st.load(src)
        source_bytes[id(tensors[hf])] = info.nbytes
    return StageWeights(config, spec, tensors, digest.digest(), source_bytes)
