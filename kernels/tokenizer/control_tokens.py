"""Control tokens in user text, kept as text: ``encode_chat(..., sanitize_control_tokens=True)``.

A chat template writes control tokens (``<|im_start|>``, ``<start_of_turn>``) to frame the
turns. If a user's message contains the same strings, encoding the rendered prompt turns
them into the real tokens too, and the user can forge a system turn. With sanitizing on,
every control token inside a user-supplied string (messages, tools, documents, extra
template variables) is wrapped in two private-use markers before rendering; the rendered
text is then encoded piece by piece, the marked tokens as plain text and everything the
template wrote as usual. This is transformers' ``sanitize_control_tokens``, and its ids are
the reference.

Control tokens are the special added tokens, plus the added tokens the template's own text
contains (except whitespace tokens like Gemma's "\\n", which templates write as text).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["ControlTokenMarker", "UnsanitizableText"]

_START, _END = "\U000f0000", "\U000f0001"


class UnsanitizableText(ValueError):
    """User text holds a control token that this vocabulary also produces from plain text."""


class ControlTokenMarker:
    """Marks control tokens in user strings, and splits a rendered prompt back along the marks."""

    def __init__(self, control_tokens: Iterable[str]) -> None:
        longest_first = sorted(set(control_tokens), key=len, reverse=True)
        self._tokens = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
        self._marked = re.compile(f"{_START}({self._tokens.pattern}){_END}|[{_START}{_END}]")

    def mark(self, value: Any) -> Any:
        """``value`` (a string, or lists and dicts of them) with its control tokens wrapped; dict keys stay."""
        if isinstance(value, str):
            # Markers already in the text are dropped, so none can be forged.
            value = value.replace(_START, "").replace(_END, "")
            return self._tokens.sub(lambda m: f"{_START}{m.group(0)}{_END}", value)
        if isinstance(value, dict):
            return {k: self.mark(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.mark(v) for v in value]
        return value

    def encode(self, rendered: str, encode: Callable[[str], list[int]], encode_as_text: Callable[[str], list[int]],
               token_to_id: Callable[[str], int | None]) -> list[int]:
        """The ids of a prompt rendered from marked inputs: marked tokens as text, the rest as usual.

        A lone marker (a template split a marked token with string methods) is dropped but still
        cuts the text, so the text on its two sides cannot join into a control token.
        """
        pieces = self._marked.split(rendered)  # text, token-or-None, text, token-or-None, ..., text
        newline = encode("\n")
        ids = encode(pieces[0])
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1
            piece_ids = _mid_text(encode_as_text if as_text else encode, piece, newline)
            if as_text and token_to_id(piece) in piece_ids:
                raise UnsanitizableText(
                    f"cannot keep {piece!r} in the user's text as text: this vocabulary makes the control token "
                    "from plain text too; remove it from the message or send without sanitize_control_tokens")
            ids += piece_ids
        return ids


def _mid_text(encode: Callable[[str], list[int]], piece: str, newline: list[int]) -> list[int]:
    # Encoded after a newline, so a SentencePiece vocabulary adds none of the "▁" it puts at the
    # start of a text; the newline's ids are then cut off again.
    ids = encode("\n" + piece)
    return ids[len(newline):] if ids[:len(newline)] == newline else encode(piece)
