"""Encoding a long text in parallel: cut it where no token can span, encode the pieces at once.

A BPE never merges across the pieces its pre-tokenizer and added tokens cut a text into.
Each split regex a GGUF byte-level vocabulary gets (GPT-2's and those of
``gguf_vocab.PRE_TOKENIZER_SPLITS``) ends a piece at a lone newline (a non-space before it, a
letter after it): no alternative matches a newline and then a letter. Gemma makes "\n" an
added token, which cuts there too. So cutting right after such a newline changes no id, as
long as no added token itself holds a newline followed by a letter (the added-token match
runs on the whole text first). The builder says whether a vocabulary is one of those
(``TokenizerSpec.cut_at_newlines``); other SentencePiece vocabularies (a "▁" is prefixed to
a text's first piece) and tokenizer.json files stay whole.
"""

from __future__ import annotations

import re
from itertools import pairwise

from tokenizers import Tokenizer as BackendTokenizer

__all__ = ["can_cut", "cut"]

# A lone newline between a non-space and a letter. (After a run of whitespace GPT-2's
# "\s+(?!\S)" leaves the run's last character to the next piece, so a cut there is unsafe.)
_CUT = re.compile(r"(?<=\S)\n(?=[^\W\d_])")
_SPANS_A_CUT = re.compile(r"\n[^\W\d_]")


def can_cut(backend: BackendTokenizer) -> bool:
    """Whether no added token of ``backend`` spans a cut (the split regex is the builder's to vouch for)."""
    return not any(_SPANS_A_CUT.search(token.content) for token in backend.get_added_tokens_decoder().values())


def cut(text: str, pieces: int) -> list[str]:
    """``text`` in at most ``pieces`` parts of roughly equal size, each cut after a lone newline before a letter."""
    step = max(1, len(text) // pieces)
    starts = [0]
    for match in _CUT.finditer(text):
        if match.end() - starts[-1] >= step:
            starts.append(match.end())
    starts.append(len(text))
    return [text[a:b] for a, b in pairwise(starts) if b > a]
