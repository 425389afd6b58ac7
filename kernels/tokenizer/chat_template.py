"""Rendering a model's chat template (``tokenizer.chat_template``) the way transformers does.

A chat template is a jinja2 program shipped inside the model file, so it is untrusted code:
it runs in jinja's immutable sandbox, and everything it sees is rebuilt from plain JSON
types first. The environment matches transformers' (``trim_blocks``, ``lstrip_blocks``,
loop controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII and
HTML characters, a ``dict`` constructor and an underscore-proof ``namespace``), and so do the
variables: ``messages`` (keys whose value is None dropped), ``add_generation_prompt``,
``tools``, ``documents``, the model's special tokens that are set (an unset one stays
undefined), and any extra keyword. Whatever the template does with them -- Qwen's default
system prompt when the messages have none, SmolLM's -- follows from rendering it faithfully.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "ChatTemplateError", "ChatTemplateMissing"]


class ChatTemplateMissing(ValueError):
    """The model ships no chat template (a base model): it takes raw completion prompts only."""


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (its own ``raise_exception``) or failed to render."""


class ChatTemplate:
    """One compiled chat template."""

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._template = _compile(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the model's chat template does not parse (line {exc.lineno}: {exc.message})") from None

    def literal_text(self) -> str:
        """The template's own strings (its text and string constants), joined by NULs so no search spans two."""
        ast = self._template.environment.parse(self.source)
        literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
        literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
        return "\0".join(sorted(literals))

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        special_tokens: Mapping[str, str | None] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for ``messages``; ``extra`` keywords are visible to the template."""
        if not messages:
            raise ChatTemplateError("the conversation is empty: send at least one message")
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise ChatTemplateError(f"each message must be a mapping with 'role' and 'content', got {message!r}")
            chat.append({k: v for k, v in message.items() if v is not None})
        tokens = {name: value for name, value in (special_tokens or {}).items() if value is not None}
        variables = {**tokens, **extra}
        try:
            return self._template.render(
                messages=_plain(chat),
                add_generation_prompt=bool(add_generation_prompt),
                tools=_plain(tools),
                documents=_plain(documents),
                **_plain(variables),
            )
        except jinja2.exceptions.SecurityError as exc:
            raise ChatTemplateError(f"the model's chat template did something the sandbox forbids ({exc}); "
                                    "the model file may be malicious") from None
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template refused this conversation: {exc}") from None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which chat templates never want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` for templates, without handing them the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja namespace that refuses underscore attributes (no path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types, so the sandbox sees no foreign methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"
