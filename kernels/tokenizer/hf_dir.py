"""A tokenizer read from a Hugging Face model directory (``tokenizer.json`` and its configs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from kernels.tokenizer.spec import TokenizerLoadError, TokenizerSpec

__all__ = ["read_hf_tokenizer"]


def read_hf_tokenizer(path: str | Path) -> TokenizerSpec:
    """``tokenizer.json`` with the special tokens and chat template of ``tokenizer_config.json``.

    The chat template may also sit in ``chat_template.jinja``; a list of named templates
    gives its ``default`` one. ``generation_config.json``'s ``eos_token_id`` (one id or a
    list) adds stop ids.
    """
    path = Path(path)
    try:
        backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception on a bad file
        raise TokenizerLoadError(f"{path / 'tokenizer.json'} is not a readable tokenizers file: {exc}") from None
    config = _read_json(path / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    jinja_file = path / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    eos_ids = _read_json(path / "generation_config.json").get("eos_token_id")
    stops = eos_ids if isinstance(eos_ids, list) else ([eos_ids] if isinstance(eos_ids, int) else [])
    return TokenizerSpec(
        backend=backend,
        bos_token=_content(config.get("bos_token")),
        eos_token=_content(config.get("eos_token")),
        unk_token=_content(config.get("unk_token")),
        pad_token=_content(config.get("pad_token")),
        chat_template=template or None,
        stop_token_ids=tuple(int(i) for i in stops),
    )


def _content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerLoadError(f"{path} is not valid JSON ({exc}); restore it from the model's repository") from None
