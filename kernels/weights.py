"""Load only the tensors of one stage, with Hugging Face names, from GGUF or safetensors.

``load_weights(path, spec, mode)`` returns a ``StageWeights`` whose ``tensors`` maps
HF names to either

- ``np.ndarray`` float32 (norms, biases, and every matrix in ``mode="float32"``), or
- ``QuantTensor`` (``mode="quant"``, GGUF matrices stored as Q4_0/Q4_1/Q8_0): the
  block fields as they are in the file, so a backend can map them onto its own
  quantized format without a float round trip. For Q4_1, ``w = scale*q + min``
  per group of 32 along the row, which is MLX's affine group-32 4-bit format
  (``biases`` = ``min``).

Names present for a stage ``[a, b)``:
``model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight``,
``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`` (+ ``{q,k,v}_proj.bias`` with
qkv bias), ``model.layers.{i}.mlp.{gate,up,down}_proj.weight`` for i in [a, b);
``model.embed_tokens.weight`` if ``spec.embed``; ``model.norm.weight`` and
``lm_head.weight`` if ``spec.head`` (with tied embeddings ``lm_head.weight`` is the
token embedding; if the stage also embeds, both names refer to the same object).

Matrices are ``(out_features, in_features)``. GGUF q/k rows are un-permuted to
HF layout (llama.cpp permutes them for its rope kernel; see transformers'
``reverse_permute_weights``). Tensors of other layers are never read: GGUF and
safetensors files are memory-mapped and only the needed byte ranges are touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import blake3
import numpy as np

from kernels.config import ModelConfig, config_from_gguf, config_from_hf_dir
from kernels.gguf import blocks, dequantize, open_gguf
from kernels.safetensors import SafetensorsDir
from kernels.stage import WEIGHT_MODES, StageSpec

QUANT_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q8_0")

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_HF_TO_GGUF_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


@dataclass
class QuantTensor:
    """A GGUF block-quantized matrix ``(rows, cols)``, kept in its block form.

    ``scale``: float16 ``(rows, cols // 32)``; ``min``: float16, same shape (Q4_1 only);
    ``qs``: ``(rows, cols)`` uint8 in 0..15 (Q4_0/Q4_1) or int8 (Q8_0).
    Value: Q4_1 ``scale*q + min``; Q4_0 ``scale*(q - 8)``; Q8_0 ``scale*q``.
    """

    type_name: str
    shape: tuple[int, int]
    scale: np.ndarray
    qs: np.ndarray
    min: np.ndarray | None = None

    GROUP = 32

    def dequantize(self) -> np.ndarray:
        s = np.repeat(self.scale.astype(np.float32), self.GROUP, axis=1)
        q = self.qs.astype(np.float32)
        if self.type_name == "Q4_0":
            return (q - 8.0) * s
        if self.type_name == "Q4_1":
            return q * s + np.repeat(self.min.astype(np.float32), self.GROUP, axis=1)
        return q * s

    @property
    def nbytes(self) -> int:
        """Bytes as stored in the file (4-bit codes count as half a byte)."""
        per_q = 0.5 if self.type_name in ("Q4_0", "Q4_1") else 1.0
        extra = self.min.nbytes if self.min is not None else 0
        return int(self.qs.size * per_q) + self.scale.nbytes + extra


Tensor = np.ndarray | QuantTensor


@dataclass
class StageWeights:
    config: ModelConfig
    spec: StageSpec
    tensors: dict[str, Tensor]
    source_digest: bytes = field(repr=False, default=b"")

    def n_params(self) -> int:
        """Parameters held, counting a tied embedding/head shared object once."""
        seen: set[int] = set()
        total = 0
        for t in self.tensors.values():
            if id(t) in seen:
                continue
            seen.add(id(t))
            total += int(np.prod(t.shape))
        return total


def expected_names(config: ModelConfig, spec: StageSpec) -> list[str]:
    """The HF tensor names a stage must hold."""
    names = []
    if spec.embed:
        names.append("model.embed_tokens.weight")
    per_layer = [v for k, v in _LAYER_MAP.items() if config.qkv_bias or not k.endswith(".bias")]
    for i in spec.layers():
        names += [f"model.layers.{i}.{n}" for n in per_layer]
    if spec.head:
        names += ["model.norm.weight", "lm_head.weight"]
    return names


def _gguf_name(hf: str, config: ModelConfig) -> str:
    if hf in _GLOBAL_MAP:
        if hf == "lm_head.weight" and config.tie_embeddings:
            return "token_embd.weight"
        return _GLOBAL_MAP[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{_HF_TO_GGUF_LAYER[rest]}"


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


def load_weights(path: str | Path, spec: StageSpec, mode: str = "float32") -> StageWeights:
    """Read the tensors of ``spec`` from a ``.gguf`` file or an HF directory."""
    if mode not in WEIGHT_MODES:
        raise ValueError(f"mode {mode!r}: use one of {WEIGHT_MODES}")
    path = Path(path)
    if path.is_dir():
        return _load_safetensors(path, spec)
    return _load_gguf(path, spec, mode)


def _load_gguf(path: Path, spec: StageSpec, mode: str) -> StageWeights:
    gf = open_gguf(path)
    config = config_from_gguf(gf)
    spec.validate(config)
    digest = blake3.blake3()
    digest.update(f"{spec.start}:{spec.end}:{int(spec.embed)}:{int(spec.head)}|".encode())
    tensors: dict[str, Tensor] = {}
    by_source: dict[str, Tensor] = {}
    for hf in expected_names(config, spec):
        src = _gguf_name(hf, config)
        if src not in gf.tensors:
            raise ValueError(f"{path}: tensor {src} (for {hf}) is missing from the GGUF file")
        if src in by_source:  # tied head reuses the embedding already loaded
            tensors[hf] = by_source[src]
            continue
        info = gf.tensors[src]
        raw = gf.raw(src)
        digest.update(f"{hf}|{info.type_name}|{info.shape}|".encode())
        digest.update(memoryview(raw))
        n_head = _permute_heads(hf, config)
        if mode == "quant" and info.type_name in QUANT_BLOCK_TYPES and len(info.shape) == 2:
            b = blocks(raw, info.type_name, info.shape)
            qt = QuantTensor(info.type_name, info.shape, np.array(b["scale"]),
                             np.array(b["qs"]).reshape(info.shape),
                             np.array(b["min"]) if "min" in b else None)
            if n_head:
                qt.scale, qt.qs = _unpermute(qt.scale, n_head), _unpermute(qt.qs, n_head)
                if qt.min is not None:
                    qt.min = _unpermute(qt.min, n_head)
            t: Tensor = qt
        else:
            t = dequantize(raw, info.type_name, info.shape, name=src)
            if n_head:
                t = np.ascontiguousarray(_unpermute(t, n_head))
        tensors[hf] = by_source[src] = t
    return StageWeights(config, spec, tensors, digest.digest())


def _load_safetensors(directory: Path, spec: StageSpec) -> StageWeights:
    st = SafetensorsDir(directory)
    config = config_from_hf_dir(directory)
    spec.validate(config)
    digest = blake3.blake3()
    digest.update(f"{spec.start}:{spec.end}:{int(spec.embed)}:{int(spec.head)}|".encode())
    tensors: dict[str, Tensor] = {}
    for hf in expected_names(config, spec):
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
    return StageWeights(config, spec, tensors, digest.digest())
