"""A tokenizer read from a Hugging Face directory equals the one built from the same model's GGUF."""

from __future__ import annotations

import json

import pytest

from kernels.tokenizer import Tokenizer, TokenizerLoadError

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋"}]


@pytest.fixture(scope="module")
def gguf_tokenizer(model_path) -> Tokenizer:
    return Tokenizer.from_model(model_path)


def test_same_ids_stops_and_template(tmp_path, gguf_tokenizer):
    tok = gguf_tokenizer
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": tok.chat_template}))
    loaded = Tokenizer.from_model(tmp_path)
    text = "Hello 👋 world <|im_start|>  \t\n"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.eos_token_ids == tok.eos_token_ids
    assert loaded.apply_chat_template(MESSAGES) == tok.apply_chat_template(MESSAGES)


def test_named_templates_jinja_file_and_generation_stops(tmp_path, gguf_tokenizer):
    gguf_tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>",
        "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_model(tmp_path)
    assert loaded.apply_chat_template(MESSAGES) == "default"
    assert loaded.eos_token_ids == (2, 0)

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[-1].content }}")
    assert Tokenizer.from_model(tmp_path).apply_chat_template(MESSAGES) == "Hi 👋"


def test_unreadable_files_are_typed(tmp_path):
    with pytest.raises(TokenizerLoadError, match="not exactly one .gguf"):
        Tokenizer.from_model(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerLoadError, match="not a readable tokenizers file"):
        Tokenizer.from_model(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(TokenizerLoadError, match="neither a GGUF file nor a model directory"):
        Tokenizer.from_model(tmp_path / "notes.txt")
