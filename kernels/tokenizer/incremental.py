"""Streaming token ids out as text, one token at a time, without broken characters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    byte_fallback_ids: frozenset[int]
    special_token_ids: frozenset[int]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turn a stream of token ids into text, never ending a piece inside a UTF-8 sequence.

    A multi-byte character (an emoji, CJK) can be spread over several byte tokens, and a
    decoder may treat a sequence's first token specially (SentencePiece drops its leading
    space). So each ``feed`` decodes a short window -- the tokens already emitted since the
    last cut, as context, plus the new ones -- and returns only what the new tokens add. While
    the window ends in U+FFFD (an unfinished character) nothing is returned; the bytes wait for
    the tokens that finish them. SentencePiece byte tokens (``<0xNN>``) are held while their
    run lasts, because the decoder turns a whole run into U+FFFDs if any of it is invalid.
    ``"".join(feeds) + flush() == tokenizer.decode(all_ids)``, and every prefix of that join
    is a prefix of the full decode.
    """

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._bytes = tokenizer.byte_fallback_ids
        # Tokens the decode drops: they do not end a run of byte tokens.
        self._invisible = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._in_byte_run = False
        self._ids: list[int] = []
        # The text of _ids[_prefix:_read] is already emitted; it is decoded again as context.
        self._prefix = 0
        self._read = 0

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def feed(self, token_id: int) -> str:
        """The text ``token_id`` completes (often all of its own, sometimes "" while a character is unfinished)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if token_id in self._bytes or (self._in_byte_run and token_id in self._invisible):
            self._in_byte_run = True
            return ""
        self._in_byte_run = False
        emitted, window = self._decode_window()
        if len(window) > len(emitted) and not window.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return window[len(emitted):]
        return ""

    def flush(self) -> str:
        """The held-back text at the end of the stream (U+FFFD for bytes that never completed)."""
        emitted, window = self._decode_window()
        self._prefix = self._read = len(self._ids)
        self._in_byte_run = False
        return window[len(emitted):]

    def _decode_window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        return decode(self._ids[self._prefix:self._read], self._skip), decode(self._ids[self._prefix:], self._skip)
