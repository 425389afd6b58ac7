"""SentencePiece GGUF vocabularies built in seconds, against transformers; the merge order; bad files."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_models import reference, write_byte_level_gguf, write_sentencepiece_gguf

from kernels.gguf import open_gguf
from kernels.tokenizer import Tokenizer, TokenizerLoadError
from kernels.tokenizer.gguf_vocab import merges_from_vocab, spec_from_gguf_metadata

VARIANTS = {
    # Byte-level BPE with the Llama 3 split; the file says nothing about BOS (so none is added).
    "bpe-llama3": ("gpt2", {"pre": "llama-bpe"}),
    "bpe-default-bos-eos": ("gpt2", {"pre": "smollm", "add_bos_token": True, "add_eos_token": True}),
    # Llama 2 style: a "▁" before the text, BOS added (both by default when the file is silent).
    "llama-defaults": ("llama", {}),
    "llama-no-prefix": ("llama", {"add_space_prefix": False, "add_bos_token": False, "add_eos_token": True}),
    # Gemma style: merges in file order, real-space runs, no prefix, BOS.
    "gemma3": ("gemma3", {"gemma_specials": True, "add_space_prefix": False, "add_bos_token": True}),
}

TEXTS = ["the thin ant 123 1234 12345", "<|begin_of_text|>the<|eot_id|>\n\n  a<think><tab>\t",
         "hello world", " hello  world", "hello   world\n\nhello", "  leading", "trailing  ", "",
         "<|user|>hello<think>中文", "<start_of_turn>user\nhello<end_of_turn>\n", "héllo wörld 😀", "\t\x00\x7f",
         "<s>hello</s> <unk>", "<b>hello</b>"]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def synthetic(request, tmp_path_factory):
    arch, flags = VARIANTS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    if arch == "gpt2":
        path = write_byte_level_gguf(folder / "vocab.gguf", **flags)
    else:
        path = write_sentencepiece_gguf(folder / "vocab.gguf", arch, **flags)
    ref = reference(path)
    if arch == "llama" and flags.get("add_space_prefix") is False:
        # transformers ignores tokenizer.ggml.add_space_prefix outside the Gemma family and always
        # writes the "▁" prefix; llama.cpp honours the flag, and so do we. The reference gets the
        # flag applied by hand: everything else must still be transformers' own.
        from tokenizers import decoders, pre_tokenizers

        assert json.loads(ref.backend_tokenizer.to_str())["pre_tokenizer"]["prepend_scheme"] == "first"
        backend = ref.backend_tokenizer
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer.from_model(path), ref


def test_pipeline_equals_transformers(synthetic):
    tok, ref = synthetic
    assert json.loads(tok.backend.to_str()) == json.loads(ref.backend_tokenizer.to_str())


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_decode_match_transformers(synthetic, text):
    tok, ref = synthetic
    ids = tok.encode(text)
    assert ids == ref(text)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from("hello world中文▁ \n\té😀") | st.characters(exclude_categories=("Cs",)),
                    max_size=30))
def test_random_text_matches_transformers(synthetic, text):
    tok, ref = synthetic
    ids = tok.encode(text)
    assert ids == ref(text)["input_ids"]
    assert tok.decode(ids) == ref.decode(ids)


def test_byte_fallback_and_prefix_space(tmp_path):
    tok = Tokenizer.from_model(write_sentencepiece_gguf(tmp_path / "v.gguf", "llama"))
    # "é" has no piece: it falls back to its two UTF-8 bytes, and decodes back whole.
    ids = tok.encode("é", add_special_tokens=False)
    assert [tok.backend.id_to_token(i) for i in ids] == ["▁", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids) == "é"
    assert tok.encode("hello")[:2] == [tok.bos_token_id, tok.token_to_id("▁hello")]


# Random SentencePiece vocabularies over a tiny alphabet (every letter a token, so most
# tokens can be cut several ways), with many tied scores.
VOCABS = st.lists(st.text(alphabet="ab▁c", min_size=2, max_size=6), min_size=1, max_size=60, unique=True).map(
    lambda words: list("ab▁c") + [w for w in words if w not in "ab▁c"])


@settings(max_examples=200, deadline=None)
@given(tokens=VOCABS, scores=st.lists(st.integers(-2, 0), min_size=64, max_size=64), by_position=st.booleans())
def test_merge_order_equals_transformers(tokens, scores, by_position):
    generate_merges = pytest.importorskip("transformers.tokenization_utils_base").generate_merges
    vocab = {t: i for i, t in enumerate(tokens)}
    rank = {t: -i for i, t in enumerate(tokens)} if by_position else dict(zip(tokens, map(float, scores)))
    assert merges_from_vocab(vocab, rank) == generate_merges(vocab, rank)


def test_unsupported_tokenizer_type_says_what_is_supported():
    with pytest.raises(TokenizerLoadError, match=r"'bert' is not supported \(supported: gpt2, llama\)"):
        spec_from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def test_file_without_tokenizer_is_refused():
    with pytest.raises(TokenizerLoadError, match="no tokenizer.ggml.tokens"):
        spec_from_gguf_metadata({"general.architecture": "llama"})
    with pytest.raises(TokenizerLoadError, match="needs tokenizer.ggml.scores"):
        spec_from_gguf_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"]})


def test_no_token_past_the_vocabulary(tmp_path):
    # A byte-level file without GPT-2's "<|endoftext|>" (Llama 3's have none): transformers adds
    # it as a new id past the model's embedding; we keep exactly the file's tokens.
    path = write_byte_level_gguf(tmp_path / "v.gguf", "llama-bpe", gpt2_endoftext=False)
    tok, ref = Tokenizer.from_model(path), reference(path)
    n_tokens = len(open_gguf(path).metadata["tokenizer.ggml.tokens"])
    assert tok.vocab_size == n_tokens and tok.token_to_id("<|endoftext|>") is None
    assert ref.convert_tokens_to_ids("<|endoftext|>") == n_tokens == len(ref) - 1


def test_split_table_is_transformers():
    # Which `tokenizer.ggml.pre` values get which split regex: the converter's own table.
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    from kernels.tokenizer.gguf_vocab import PRE_TOKENIZER_SPLITS

    assert PRE_TOKENIZER_SPLITS == mapping.GGUF_PRE_TOKENIZER_SPLITS
