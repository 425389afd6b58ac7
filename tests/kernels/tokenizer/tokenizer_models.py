"""The real models whose GGUF tokenizers are checked, and transformers' tokenizer of each.

smollm2-135m (byte-level BPE, "smollm" split) is the default model and always there.
qwen2.5-coder-0.5b and -1.5b (byte-level BPE, "qwen2" split, a template with a default system
prompt and tools; the two differ only in that template's tools text) and gemma-3-270m (SentencePiece, no chat template: a base model) are tested when cached;
loading transformers' tokenizer for them takes 10-15 s, so their cases are marked slow.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import pytest

MODELS = [
    pytest.param("smollm2-135m", id="smollm2"),
    pytest.param("qwen2.5-coder-0.5b", id="qwen2.5", marks=pytest.mark.slow),
    pytest.param("qwen2.5-coder-1.5b", id="qwen2.5-1.5b", marks=pytest.mark.slow),
    pytest.param("gemma-3-270m", id="gemma3", marks=pytest.mark.slow),
]
CHAT_MODELS = MODELS[:3]  # gemma-3-270m is a base model: no chat template


def cached_gguf(name: str) -> Path:
    """The model's GGUF in the mesh cache, or skip the test saying how to get it."""
    from mesh import models

    if name in models.REGISTRY:
        if models.is_cached(name):
            return models.resolve(name)
    else:  # a model the registry does not list yet: any single .gguf in its cache folder
        found = sorted((models.cache_dir() / name).glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    pytest.skip(f"{name} is not in the model cache ({models.cache_dir() / name}); "
                f"run `python -m mesh models pull {name}` to test it")


@cache
def ours(path: Path):
    from kernels.tokenizer import Tokenizer

    return Tokenizer.from_model(path)


@cache
def reference(path: Path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# -- tiny synthetic SentencePiece GGUFs, written with the gguf library ----------------------------

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
# Pieces with several ways to cut them, and scores with ties, so the merge order is exercised.
PIECES = ["▁", "e", "h", "l", "o", "w", "r", "d", "a", "中", "文", "el", "▁h", "he", "ll", "lo", "hel", "▁he",
          "▁hel", "llo", "ello", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "中文", "▁中", "▁中文", "▁▁", "▁▁▁"]


def write_sentencepiece_gguf(path: Path, arch: str, *, gemma_specials: bool = False, user_defined: tuple[str, ...] = (),
                             **flags) -> Path:
    """A vocabulary-only GGUF of ``tokenizer.ggml.model == "llama"``; ``user_defined`` pieces are
    marked USER_DEFINED; ``flags`` name GGUFWriter.add_* calls."""
    import gguf

    if gemma_specials:  # Gemma's layout: specials first, whitespace runs and markup user-defined
        head = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<mask>", 3), ("<start_of_turn>", 3),
                ("<end_of_turn>", 3), ("\n", 4), ("\n\n", 4), ("  ", 4), ("   ", 4), ("<b>", 4)]
        ids = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}
    else:  # Llama 2's: <unk> <s> </s>
        head = [("<unk>", 2), ("<s>", 3), ("</s>", 3), ("<|user|>", 3), ("<think>", 4)]
        ids = {"unk": 0, "bos": 1, "eos": 2}
    tokens = [t for t, _ in head] + BYTE_TOKENS + PIECES
    types = [k for _, k in head] + [6] * 256 + [4 if p in user_defined else 1 for p in PIECES]
    scores = [-1000.0] * len(head) + [0.0] * 256 + [-float(i // 3) for i in range(len(PIECES))]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(ids["unk"])
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    if "pad" in ids:
        writer.add_pad_token_id(ids["pad"])
    for name, value in flags.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def write_byte_level_gguf(path: Path, pre: str, *, gpt2_endoftext: bool = True, **flags) -> Path:
    """A vocabulary-only GGUF of ``tokenizer.ggml.model == "gpt2"``: the 256 byte symbols, a few
    merges, control tokens (one spelled outside the byte alphabet, a converter mislabel) and a
    user-defined one; ``flags`` name GGUFWriter.add_* calls. ``gpt2_endoftext`` puts GPT-2's
    "<|endoftext|>" in the vocabulary, as GPT-2's descendants (SmolLM, Qwen) have it."""
    import gguf

    from kernels.tokenizer.gguf_vocab import byte_alphabet

    symbols = list(byte_alphabet().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "1 2", "12 3", "Ċ Ċ", "Ġ Ġ"]
    merged = [m.replace(" ", "") for m in merges]
    head = [("<|begin_of_text|>", 3), ("<|end_of_text|>", 3), ("<|eot_id|>", 3), ("<think>", 4), ("<tab>\t", 3)]
    if gpt2_endoftext:
        head.append(("<|endoftext|>", 3))
    tokens = symbols + merged + [t for t, _ in head]
    types = [1] * (len(symbols) + len(merged)) + [k for _, k in head]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    writer.add_eos_token_id(tokens.index("<|end_of_text|>"))
    for name, value in flags.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path
