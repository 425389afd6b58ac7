"""What a tokenizer source (a GGUF file, a Hugging Face directory) yields, and its errors."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors


class TokenizerLoadError(ValueError):
    """The model files do not describe a tokenizer we can build."""


@dataclass(frozen=True)
class TokenizerSpec:
    """A built `tokenizers` backend and the facts about it the model files state.

    ``backend`` already adds BOS/EOS in ``encode(..., add_special_tokens=True)`` exactly where
    the model asks for them. ``stop_token_ids`` are ids the files name as ending a turn
    besides the EOS (GGUF ``eot``/``eom``, ``generation_config.json``'s list).
    ``cut_at_newlines``: the builder vouches that no pre-token spans a newline followed by a
    letter, so a long text may be cut there and encoded in parallel (see ``long_text``).
    """

    backend: BackendTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = None
    stop_token_ids: tuple[int, ...] = ()
    cut_at_newlines: bool = False


def set_bos_eos_post_processor(backend: BackendTokenizer, bos: str | None, eos: str | None) -> None:
    """Add ``bos`` before and ``eos`` after each sequence (either may be None), as transformers does."""
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(token, backend.token_to_id(token)) for token in (bos, eos) if token]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=list(dict(special).items()))
