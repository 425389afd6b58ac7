"""IncrementalDetokenizer: the pieces add up to the full decode, and none ends inside a character."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_models import ours, write_sentencepiece_gguf

from kernels.tokenizer import IncrementalDetokenizer, Tokenizer

FIXTURE_SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def real(gguf_model) -> Tokenizer:
    return ours(gguf_model[1])


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory) -> Tokenizer:
    """A Llama 2 style vocabulary: byte fallback, and a decoder that drops the first "▁"."""
    return Tokenizer.from_model(write_sentencepiece_gguf(tmp_path_factory.mktemp("sp") / "v.gguf", "llama"))


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [detok.feed(i) for i in ids]
    pieces.append(detok.flush())
    assert detok.ids == ids
    return pieces


def check_stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    pieces = stream(tokenizer, ids, skip_special_tokens)
    full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == full
    text = ""
    for piece in pieces[:-1]:
        text += piece
        assert full.startswith(text)  # nothing emitted is ever taken back
        assert not piece.endswith("\ufffd")  # no piece stops inside a UTF-8 sequence
    return pieces


# Text a model spells without loss: no surrogates, no C0 controls (smollm2 has no token for some).
SPELLABLE = st.characters(exclude_categories=("Cs", "Cc")) | st.sampled_from("\t\n\r 😀👨‍👩‍👧中文é")


@FIXTURE_SETTINGS
@given(text=st.text(alphabet=SPELLABLE, max_size=40))
def test_stream_of_text_is_the_text(real, text):
    ids = real.encode(text, add_special_tokens=False)
    if real.decode(ids) != text:  # a character the vocabulary cannot spell (smollm2 lacks some bytes)
        return
    pieces = check_stream(real, ids)
    # no replacement character but the text's own (hypothesis once drew the text "\ufffd")
    assert sum(piece.count("\ufffd") for piece in pieces) == text.count("\ufffd")


@FIXTURE_SETTINGS
@given(data=st.data())
def test_stream_of_any_ids_is_their_decode(real, data):
    # Random ids can spell invalid UTF-8 that never completes: it still comes out, once, at its place.
    ids = data.draw(st.lists(st.integers(0, real.vocab_size - 1), max_size=30))
    check_stream(real, ids)
    check_stream(real, ids, skip_special_tokens=True)


@FIXTURE_SETTINGS
@given(text=st.lists(SPELLABLE | st.sampled_from(["▁", "hello", " world", "  "]), max_size=15).map("".join),
       ids=st.lists(st.integers(0, 320) | st.sampled_from([1, 2, 3, 4]), max_size=20))
def test_sentencepiece_streams(sentencepiece, text, ids):
    check_stream(sentencepiece, sentencepiece.encode(text, add_special_tokens=False))
    ids = [i for i in ids if i < sentencepiece.vocab_size]
    check_stream(sentencepiece, ids)
    # Skipped specials mid-stream must not lose the space the decoder strips only at the start.
    check_stream(sentencepiece, ids, skip_special_tokens=True)


def test_split_emoji_is_held_until_complete(real):
    text = "a 👨‍👩‍👧‍👦 b 🇫🇷 中文 𓀀 ꙮ \U0001fae8"
    ids = real.encode(text, add_special_tokens=False)
    # Rare characters are spelled by byte tokens, so some tokens alone are incomplete UTF-8 ...
    assert any("\ufffd" in real.decode([i]) for i in ids)
    pieces = check_stream(real, ids)
    # ... and the stream holds them back: some feeds return nothing, none returns U+FFFD.
    assert "" in pieces[:-1] and all("\ufffd" not in piece for piece in pieces)


def test_byte_fallback_character_is_held_until_complete(sentencepiece):
    ids = sentencepiece.encode("é", add_special_tokens=False)  # "▁", <0xC3>, <0xA9>
    assert stream(sentencepiece, ids) == ["", "", "", "é"]  # a run of byte tokens waits for its end
    ids = sentencepiece.encode("éhello", add_special_tokens=False)
    pieces = stream(sentencepiece, ids)
    assert pieces[:3] == ["", "", ""] and pieces[3].startswith("é") and "".join(pieces) == "éhello"


def test_special_tokens_are_skipped_when_asked(real):
    text = "hi" + (real.eos_token or "")
    ids = real.encode(text, add_special_tokens=False)
    assert "".join(stream(real, ids, skip_special_tokens=True)) == "hi"
    assert "".join(stream(real, ids)) == text
