"""Long texts cut at lone newlines and encoded in parallel give exactly the ids of one encode."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_models import ours, write_byte_level_gguf, write_sentencepiece_gguf
from tokenizers import AddedToken, Regex, pre_tokenizers

from kernels.tokenizer import Tokenizer
from kernels.tokenizer.gguf_vocab import PRE_TOKENIZER_SPLITS
from kernels.tokenizer.long_text import can_cut, cut

# Texts dense in what the split regexes care about: runs of spaces and newlines, letters,
# digits, punctuation, contractions, non-Latin letters, marks.
TEXT = st.lists(st.sampled_from(["\n", "\n\n", " ", "  ", "\t", "\r\n", "a", "The", "x.", "'s", "12", "345", "中文",
                                 "é", "e\u0301", "!", "//", " ?", "½", "😀", "_", "A\n", ".\n"]),
                max_size=40).map("".join)

SPLITS = {"gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False)} | {
    name: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    for name, regex in PRE_TOKENIZER_SPLITS.items()}


@settings(max_examples=300, deadline=None)
@given(text=TEXT, pieces=st.integers(1, 12), split=st.sampled_from(sorted(SPLITS)))
def test_cuts_are_pre_token_boundaries(text, pieces, split):
    # BPE works within pre-tokens, so equal pre-tokens mean equal ids.
    pre = SPLITS[split]
    parts = cut(text, pieces)
    assert "".join(parts) == text
    whole = [piece for piece, _ in pre.pre_tokenize_str(text)]
    assert [piece for part in parts for piece, _ in pre.pre_tokenize_str(part)] == whole


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, pieces=st.integers(2, 12))
def test_ids_of_pieces_are_the_ids_of_the_whole(gguf_model, text, pieces):
    tok = ours(gguf_model[1])
    assert tok._cuttable
    for specials in (True, False):
        assert tok._encode_in_pieces(text, specials, pieces) == tok.backend.encode(text, add_special_tokens=specials).ids


@settings(max_examples=60, deadline=None)
@given(text=TEXT, pieces=st.integers(2, 12))
def test_bos_and_eos_are_added_once(tmp_path_factory, text, pieces):
    path = tmp_path_factory.getbasetemp() / "bos-eos.gguf"
    if not path.exists():
        write_byte_level_gguf(path, "llama-bpe", add_bos_token=True, add_eos_token=True)
    tok = Tokenizer.from_model(path)
    assert tok._encode_in_pieces(text, True, pieces) == tok.backend.encode(text, add_special_tokens=True).ids


@settings(max_examples=100, deadline=None)
@given(text=TEXT, pieces=st.integers(2, 12))
def test_gemma_layout_cuts_at_its_newline_token(tmp_path_factory, text, pieces):
    path = tmp_path_factory.getbasetemp() / "gemma-layout.gguf"
    if not path.exists():
        write_sentencepiece_gguf(path, "gemma3", gemma_specials=True, add_space_prefix=False, add_bos_token=True)
    tok = Tokenizer.from_model(path)
    assert tok._cuttable
    for specials in (True, False):
        assert tok._encode_in_pieces(text, specials, pieces) == tok.backend.encode(text, add_special_tokens=specials).ids


def test_sentencepiece_without_newline_token_is_encoded_whole(tmp_path):
    # A Llama 2 style vocabulary prefixes "▁" to a text's first piece: a cut would add one.
    tok = Tokenizer.from_model(write_sentencepiece_gguf(tmp_path / "v.gguf", "llama"))
    assert not tok._cuttable
    cut_ids = tok._encode_in_pieces("hello\nworld\nhello", False, 3)
    assert cut_ids != tok.encode("hello\nworld\nhello", add_special_tokens=False)


def test_long_prompts_take_the_parallel_path(model_path):
    tok = Tokenizer.from_model(model_path)
    text = ("Hello there.\nThe quick brown fox, 123 jumps.\n\n  Indented\tcode();\n" * 2000)[:70_000]
    assert tok._cuttable and len(text) >= 65_536 and len(cut(text, 16)) == 16
    assert tok.encode(text) == tok.backend.encode(text).ids


def test_an_added_token_across_a_cut_turns_cutting_off(model_path):
    tok = Tokenizer.from_model(model_path)
    assert can_cut(tok.backend)
    tok.backend.add_tokens([AddedToken("x\nThe", normalized=False)])
    assert not can_cut(tok.backend)
