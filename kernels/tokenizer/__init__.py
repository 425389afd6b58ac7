"""A model's tokenizer, split by job.

- ``gguf_vocab``: building the tokenizer a GGUF file's metadata describes (byte-level BPE
  and SentencePiece), with the ids transformers gives for the same file;
- ``hf_dir``: reading one from a Hugging Face directory (``tokenizer.json``);
- ``chat_template``: rendering the model's chat template in a sandbox, as transformers does;
- ``control_tokens``: keeping control tokens in user text as text (opt-in, against forged turns);
- ``incremental``: streaming ids out as text without broken UTF-8;
- ``tokenizer``: the ``Tokenizer`` the rest of mesh uses, tying those together.
"""

from kernels.tokenizer.chat_template import ChatTemplateError, ChatTemplateMissing
from kernels.tokenizer.control_tokens import UnsanitizableText
from kernels.tokenizer.incremental import IncrementalDetokenizer
from kernels.tokenizer.spec import TokenizerLoadError, TokenizerSpec
from kernels.tokenizer.tokenizer import Tokenizer

__all__ = [
    "ChatTemplateError",
    "ChatTemplateMissing",
    "IncrementalDetokenizer",
    "Tokenizer",
    "TokenizerLoadError",
    "TokenizerSpec",
    "UnsanitizableText",
]
