"""A tokenizer built from a GGUF file's ``tokenizer.ggml.*`` metadata.

A GGUF carries no ``tokenizer.json``: it stores the vocabulary, per-token scores and types,
the merges (for BPE) and the special token ids under llama.cpp's key names. We rebuild from
them the `tokenizers` pipeline transformers' GGUF converter builds, so the ids equal the ones
transformers produces for the same file (the test reference). Two vocabulary types:

``gpt2`` -- byte-level BPE (Qwen2, SmolLM, Llama 3). Every token is spelled in GPT-2's
    byte alphabet; the merges are in the file. Text is split first by a regex chosen by
    ``tokenizer.ggml.pre`` (GPT-2's own unless the value names another one), then mapped
    byte by byte into the alphabet.

``llama`` -- SentencePiece BPE (Llama 2, Mistral, Gemma). Tokens spell a space as ``▁``;
    bytes with no token of their own fall back to ``<0xNN>`` tokens. The file has scores but
    usually no merges, so merges are derived from the vocabulary: every split of a token
    into two tokens is a merge, ranked by the token's score -- or, for the Gemma family,
    by its position in the file, which is Gemma's real merge order (its scores are not).
    ``add_space_prefix`` says whether a ``▁`` goes before the text (Llama: yes, Gemma: no).

In both, tokens the file marks CONTROL (``<|im_start|>``, ``<start_of_turn>``) are matched
whole in text and are special (``skip_special_tokens`` drops them); USER_DEFINED ones
(Gemma's ``\\n`` runs, ``<think>``) are matched whole and are ordinary text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from kernels.gguf import open_gguf
from kernels.tokenizer.spec import (
    TokenizerLoadError,
    TokenizerSpec,
    set_bos_eos_post_processor,
)

__all__ = ["SUPPORTED_TYPES", "read_gguf_tokenizer", "spec_from_gguf_metadata"]

SUPPORTED_TYPES = ("gpt2", "llama")

# llama.cpp's llama_token_type.
_CONTROL = 3
_USER_DEFINED = 4

# Split regexes for `tokenizer.ggml.pre` values whose split differs from GPT-2's ByteLevel
# regex (the table transformers' GGUF converter keeps). Any other value ("smollm", "gpt2",
# "default", ...) keeps GPT-2's.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2 splits digits one by one (\p{N}, not \p{N}{1,3}).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen3.5 keeps combining marks with their letters.
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Mistral's tekken: case-aware words, single digits.
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k (GPT-4o, Llama 4): case-aware words with their contractions, digits in threes.
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# SentencePiece vocabularies whose merge order is the token order in the file, not the scores.
_MERGES_BY_POSITION = ("gemma", "gemma2", "gemma3")

_TOKENIZER_KEYS = ("general.architecture", "tokenizer.chat_template")


def read_gguf_tokenizer(path: str | Path) -> TokenizerSpec:
    """The tokenizer a GGUF file describes."""
    metadata = open_gguf(path).metadata
    try:
        return spec_from_gguf_metadata(metadata)
    except TokenizerLoadError as exc:
        raise TokenizerLoadError(f"{path}: {exc}") from None


def spec_from_gguf_metadata(metadata: Mapping[str, Any]) -> TokenizerSpec:
    """The tokenizer described by GGUF metadata (a mapping of key to decoded value)."""
    meta = {k: v for k, v in metadata.items() if k.startswith("tokenizer.") or k in _TOKENIZER_KEYS}
    kind = meta.get("tokenizer.ggml.model")
    tokens: Sequence[str] | None = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerLoadError("the GGUF metadata has no tokenizer.ggml.tokens; this file carries no tokenizer")
    types: Sequence[int] = meta.get("tokenizer.ggml.token_type") or ()

    if kind == "gpt2":
        backend, spelling = _byte_level_backend(meta, tokens)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        backend, spelling = _sentencepiece_backend(meta, tokens)
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    else:
        raise TokenizerLoadError(
            f"GGUF tokenizer type {kind!r} is not supported (supported: {', '.join(SUPPORTED_TYPES)}); "
            "use a model whose tokenizer.ggml.model is one of those, or its Hugging Face directory with tokenizer.json"
        )

    def token_at(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[index] if isinstance(index, Integral) and 0 <= index < len(tokens) else None

    bos, eos = token_at("bos_token_id"), token_at("eos_token_id")
    unk, pad = token_at("unknown_token_id"), token_at("padding_token_id")
    _add_marked_tokens(backend, tokens, types, spelling, named=(bos, eos, unk, pad))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    set_bos_eos_post_processor(backend, bos if add_bos else None, eos if add_eos else None)
    stops = tuple(meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta)
    return TokenizerSpec(
        backend=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        chat_template=meta.get("tokenizer.chat_template") or None,
        stop_token_ids=stops,
        cut_at_newlines=_cut_at_newlines(meta, backend),
    )


def _cut_at_newlines(meta: Mapping[str, Any], backend: BackendTokenizer) -> bool:
    """Whether no piece the BPE sees can span a lone newline before a letter (see ``long_text``).

    Byte-level: GPT-2's split and those of PRE_TOKENIZER_SPLITS all end a piece there.
    Gemma: "\n" is an added token, so the text is already cut around every newline, and
    nothing is prefixed to a piece. Other SentencePiece vocabularies prefix "▁" to a text's
    first piece only, so a cut would add one.
    """
    if meta.get("tokenizer.ggml.model") == "gpt2":
        return True
    if meta.get("general.architecture") in _MERGES_BY_POSITION:
        newline = backend.token_to_id("\n")
        return newline is not None and newline in backend.get_added_tokens_decoder()
    return False


# -- byte-level BPE (gpt2) ------------------------------------------------------------------------


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codepoints)))


def _byte_level_backend(meta: Mapping[str, Any], tokens: Sequence[str]) -> tuple[BackendTokenizer, frozenset[str]]:
    alphabet = byte_alphabet()
    spelled = frozenset(alphabet.values())
    # A token written in plain text (some converters do this) is respelled so its merges line up.
    vocab = {
        (t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i for i, t in enumerate(tokens)
    }
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    return backend, spelled


# -- SentencePiece BPE (llama) --------------------------------------------------------------------


def _sentencepiece_backend(meta: Mapping[str, Any], tokens: Sequence[str]) -> tuple[BackendTokenizer, None]:
    by_position = meta.get("general.architecture") in _MERGES_BY_POSITION
    if by_position:
        # Gemma stores its runs of two or more spaces as real spaces; the BPE spells them "▁▁".
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        if by_position:
            rank: Mapping[str, float] = {t: -i for i, t in enumerate(tokens)}
        else:
            scores = meta.get("tokenizer.ggml.scores")
            if scores is None or len(scores) != len(tokens):
                raise TokenizerLoadError("a SentencePiece ('llama') vocabulary needs tokenizer.ggml.scores, one per token")
            rank = dict(zip(tokens, scores))
        merges = merges_from_vocab(vocab, rank)
    # Only Gemma's BPE names an unknown token; with byte fallback it is never produced anyway.
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if by_position and isinstance(unk_id, Integral) and 0 <= unk_id < len(tokens) else None
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=unk, fuse_unk=True,
                                   byte_fallback=True))
    space_to_metaspace = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if by_position:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence(space_to_metaspace)
    else:
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                         prepend_scheme="first" if prefix else "never")
        strip = [decoders.Strip(content=" ", left=1, right=0)] if prefix else []
        backend.decoder = decoders.Sequence(space_to_metaspace + strip)
    return backend, None


def merges_from_vocab(vocab: Mapping[str, int], rank: Mapping[str, float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies, best first.

    Each way to cut a token into two tokens of the vocabulary is a merge; merges rank by the
    whole token's ``rank`` (higher first), then by a longer left part, then a longer right part.
    Equal keys (cuts of different tokens of equal rank) keep vocabulary order, as the stable
    sort of transformers' converter does, so the two agree tie for tie.
    """
    lefts: list[str] = []
    rights: list[str] = []
    scores: list[float] = []
    for token, score in rank.items():
        for k in range(1, len(token)):
            left = token[:k]
            if left in vocab:
                right = token[k:]
                if right in vocab:
                    lefts.append(left)
                    rights.append(right)
                    scores.append(score)
    if not lefts:
        return []
    left_len = np.fromiter(map(len, lefts), dtype=np.int64, count=len(lefts))
    right_len = np.fromiter(map(len, rights), dtype=np.int64, count=len(rights))
    # lexsort is stable and sorts by its last key first: score, then left length, then right length.
    order = np.lexsort((-right_len, -left_len, -np.asarray(scores, dtype=np.float64)))
    return [(lefts[i], rights[i]) for i in order.tolist()]


# -- tokens matched whole -------------------------------------------------------------------------


def _add_marked_tokens(backend: BackendTokenizer, tokens: Sequence[str], types: Iterable[int],
                       spelled: frozenset[str] | None, named: Iterable[str | None]) -> None:
    """Control tokens and the ``named`` ones (BOS, EOS, UNK, PAD) become special added tokens,
    user-defined ones plain added tokens.

    In a byte-level vocabulary a control token spelled outside the byte alphabet is a
    converter mislabel and is left alone (transformers does the same; adding it would grow
    the vocabulary past the model's embedding).
    """
    types = list(types)
    control = [t for t, k in zip(tokens, types) if k == _CONTROL and (spelled is None or set(t) <= spelled)]
    if control:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [t for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    added = {*control, *user}
    others = [t for t in dict.fromkeys(named) if t is not None and t not in added]
    if others:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in others])
