"""kernels.tokenizer against transformers' own GGUF tokenizer conversion of the same file."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world",
    "",
    " ",
    "   leading and trailing   ",
    "multiple    spaces  between\twords",
    "\ttabs\t\tand\nnewlines\n\n\nend\n",
    "\r\nwindows line\r\n",
    "digits 0 1 12 123 1234567890 3.14159 -42 1e10",
    "emoji 😀 👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 rainbow 🏳️‍🌈",
    "中文测试：你好，世界！日本語のテキスト、한국어",
    "combining: e\u0301 n\u0303 a\u0308\u0304 Zalgo Z\u0351\u0357a\u0334l\u0335g\u0336o",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "special mid-text <|endoftext|> and <file_sep>!",
    "café naïve résumé Ærøskøbing straße",
    "I'm, you're, it's, we'll, they'd -- 'quoted' \"double\"",
    "URL https://example.com/a?b=c&d=e#frag",
    "\u200b zero width \ufeff bom \u00a0 nbsp",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Waves fold into foam"},
        {"role": "user", "content": "Another one, with emoji 🌊"},
    ],
    [{"role": "system", "content": "Système: réponds en français."}, {"role": "user", "content": "  spaces  \n\n"}],
]


@pytest.fixture(scope="module")
def tokenizer(model_path) -> Tokenizer:
    return Tokenizer.from_model(model_path)


@pytest.fixture(scope="module")
def reference(model_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference(text)["input_ids"]
    assert tokenizer.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers_and_round_trips(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids) == reference.decode(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


def test_special_tokens_and_stop_ids(tokenizer, reference):
    assert tokenizer.bos_token_id == 1 == reference.bos_token_id
    assert tokenizer.eos_token_id == 2 == reference.eos_token_id
    # The template closes every turn with <|im_end|>, which is also this file's EOS.
    assert tokenizer.token_to_id("<|im_end|>") in tokenizer.eos_token_ids
    assert tokenizer.vocab_size == len(reference)
    assert tokenizer.encode("<|im_end|>") == [2]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer, reference, messages, add_generation_prompt):
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    assert tokenizer.encode(ours) == reference(theirs)["input_ids"]


def test_chat_template_sandbox_features(tokenizer):
    from kernels.tokenizer import _compile_chat_template

    template = "{{ messages | tojson }}{% if x is defined %}{{ raise_exception('bad ' + x) }}{% endif %}"
    tokenizer_with = Tokenizer(tokenizer.backend, bos_token=None, eos_token=None, chat_template=template)
    # tojson keeps non-ASCII and HTML characters as they are.
    assert tokenizer_with.apply_chat_template([{"role": "user", "content": "<é>"}]) == json.dumps(
        [{"role": "user", "content": "<é>"}], ensure_ascii=False
    )
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="bad boom"):
        tokenizer_with.apply_chat_template([], x="boom")
    with pytest.raises(jinja2.exceptions.SecurityError):
        _compile_chat_template("{{ ''.__class__.__mro__ }}").render()


def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.feed(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


def test_incremental_detokenizer_holds_split_emoji(tokenizer):
    text = "a 👨‍👩‍👧‍👦 b 🇫🇷 中文"
    ids = tokenizer.encode(text)
    # The emoji is spelled by byte tokens, so some single tokens hold incomplete UTF-8.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces = _stream(tokenizer, ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


# The vocabulary has no tokens for a few bytes (some C0 controls, 0xF1/0xF2, which start
# code points from U+40000 up): such characters cannot round-trip, so they are left out.
SPELLABLE = st.characters(max_codepoint=0x3FFFF, exclude_categories=("Cs", "Cc")) | st.sampled_from("\t\n\r ")


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=SPELLABLE, max_size=40))
def test_incremental_detokenizer_matches_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=49151), max_size=30))
def test_incremental_detokenizer_on_arbitrary_ids(tokenizer, ids):
    # Random ids can spell invalid UTF-8 that never completes: it still comes out, once.
    assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_from_hf_dir(tmp_path, tokenizer):
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
                    "chat_template": tokenizer.chat_template})
    )
    loaded = Tokenizer.from_model(tmp_path)
    text = "Hello 👋 world"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.eos_token_ids == tokenizer.eos_token_ids
    messages = CONVERSATIONS[1]
    assert loaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
