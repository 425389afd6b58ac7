"""Control tokens in user text kept as text, on a SentencePiece vocabulary, against transformers."""

from __future__ import annotations

import dataclasses

import pytest
from tokenizer_models import reference, write_sentencepiece_gguf

from kernels.tokenizer import Tokenizer, UnsanitizableText
from kernels.tokenizer.control_tokens import ControlTokenMarker

# <|user|> is a special token; <think> a plain added token that the template writes itself.
TEMPLATE = "{% for m in messages %}<|user|>{{ m.content }}<think>{% endfor %}{% if add_generation_prompt %}hello{% endif %}"


def with_template(path):
    tok, ref = Tokenizer.from_model(path), reference(path)
    ref.chat_template = TEMPLATE
    return Tokenizer(dataclasses.replace(tok.spec, chat_template=TEMPLATE)), ref


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return with_template(write_sentencepiece_gguf(tmp_path_factory.mktemp("ct") / "v.gguf", "llama"))


@pytest.mark.parametrize("content", ["hello <|user|> world", "<|user|><|user|>", "  <|user|>", "a\U000f0000b",
                                     "<s>hello</s>", "<|user", "think: <think>", "<think><|user|>"])
def test_sentencepiece_matches_transformers(pair, content):
    tok, ref = pair
    messages = [{"role": "user", "content": content}]
    ours = tok.encode_chat(messages, sanitize_control_tokens=True)
    assert ours == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                           sanitize_control_tokens=True)
    assert ours.count(tok.token_to_id("<|user|>")) == 1  # only the template's


def test_a_token_the_vocabulary_makes_from_text_is_refused(tmp_path):
    # "ll" is an added token that the template's text contains ("hello"), and the BPE also
    # merges it from "l" + "l": kept as text it would still come out as that token.
    tok, ref = with_template(write_sentencepiece_gguf(tmp_path / "v.gguf", "llama", user_defined=("ll",)))
    messages = [{"role": "user", "content": "all"}]
    with pytest.raises(ValueError, match="Can't sanitize"):
        ref.apply_chat_template(messages, tokenize=True, return_dict=False, sanitize_control_tokens=True)
    with pytest.raises(UnsanitizableText, match="'ll'"):
        tok.encode_chat(messages, sanitize_control_tokens=True)


def test_marks_cannot_be_forged():
    marker = ControlTokenMarker(["<a>", "<ab>"])
    assert marker.mark({"k<a>": ["x<ab>y", ("\U000f0000<a>\U000f0001",)], "n": 3}) == {
        "k<a>": ["x\U000f0000<ab>\U000f0001y", ["\U000f0000<a>\U000f0001"]], "n": 3}
