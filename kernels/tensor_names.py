"""The tensors each architecture's layer holds: GGUF name -> Hugging Face name.

Names are suffixes after ``blk.{i}.`` (GGUF) and ``model.layers.{i}.`` (HF). The
backends read layers by the HF names; ``kernels.weights`` maps them to the file.
One GGUF name means different things per family: ``ffn_norm`` is Llama's
``post_attention_layernorm`` (the norm before the MLP) but Gemma 3's
``pre_feedforward_layernorm``, since Gemma's ``post_attention_layernorm`` is a
norm on the attention output (GGUF ``post_attention_norm``).

Experts of a routed MLP are 3-D, ``(n_experts, out, in)``, one tensor per projection,
as GGUF stores them (``ffn_{gate,up,down}_exps``).
"""

from __future__ import annotations

from kernels.config import ModelConfig

_ATTENTION = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
}
_QKV_BIAS = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_QK_NORM = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_MLP = {
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_EXPERTS = {
    "ffn_gate_inp.weight": "mlp.gate.weight",  # the router, (n_experts, hidden)
    "ffn_gate_exps.weight": "mlp.experts.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.down_proj.weight",
}
_PRE_NORMS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_SANDWICH_NORMS = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}


def layer_tensor_names(config: ModelConfig) -> dict[str, str]:
    """GGUF suffix -> HF suffix of every tensor one layer of ``config`` holds."""
    names = dict(_SANDWICH_NORMS if config.sandwich_norms else _PRE_NORMS)
    names.update(_ATTENTION)
    if config.qkv_bias:
        names.update(_QKV_BIAS)
    if config.qk_norm:
        names.update(_QK_NORM)
    names.update(_EXPERTS if config.moe else _MLP)
    return names
