"""Text <-> token ids for one model, its special tokens, stop ids and chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Encoding
from tokenizers import Tokenizer as BackendTokenizer

from kernels.tokenizer.chat_template import ChatTemplate, ChatTemplateMissing
from kernels.tokenizer.control_tokens import ControlTokenMarker
from kernels.tokenizer.gguf_vocab import read_gguf_tokenizer
from kernels.tokenizer.hf_dir import read_hf_tokenizer
from kernels.tokenizer.long_text import can_cut, cut
from kernels.tokenizer.spec import TokenizerLoadError, TokenizerSpec

__all__ = ["Tokenizer"]

_GGUF_MAGIC = b"GGUF"

# Texts from this many characters up are cut and encoded in parallel, where that is exact.
PARALLEL_MIN_CHARS = 1 << 16
_PARALLEL_PIECES = 16

# Markers that end an assistant turn in common chat templates. Generation stops on the ones
# the model's own template writes, besides the declared EOS.
_END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")


class Tokenizer:
    """Text <-> token ids for one model, and its chat template.

    The two ways into a model: ``encode_prompt(text)`` for a raw completion (BOS/EOS added
    only where the model asks for them: Gemma and Llama 2 want a BOS, Qwen and SmolLM
    nothing), ``encode_chat(messages)`` for a conversation (the template writes its own
    special tokens). Both give the ids transformers gives for the same request.
    """

    def __init__(self, spec: TokenizerSpec) -> None:
        self.spec = spec
        self.backend: BackendTokenizer = spec.backend
        self.bos_token, self.eos_token = spec.bos_token, spec.eos_token
        self.unk_token, self.pad_token = spec.unk_token, spec.pad_token
        self.chat_template: str | None = spec.chat_template
        self._template: ChatTemplate | None = None  # compiled on first use: a broken one still allows raw prompts
        self._marker: ControlTokenMarker | None = None
        self.bos_token_id: int | None = self.token_to_id(self.bos_token)
        self.eos_token_id: int | None = self.token_to_id(self.eos_token)
        self.eos_token_ids: tuple[int, ...] = self._stop_ids(spec.stop_token_ids)
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, token in self.backend.get_added_tokens_decoder().items() if token.special)
        self._cuttable = spec.cut_at_newlines and can_cut(self.backend)
        # SentencePiece's <0xNN> tokens: a run of them decodes as one unit (see IncrementalDetokenizer).
        self.byte_fallback_ids: frozenset[int] = frozenset(
            i for i in (self.backend.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None
        ) if getattr(self.backend.model, "byte_fallback", False) else frozenset()

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a GGUF file or of a Hugging Face model directory."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return cls.from_hf_dir(path)
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls.from_gguf(ggufs[0])
            raise TokenizerLoadError(f"{path} has no tokenizer.json and not exactly one .gguf file; "
                                     "point at the .gguf file itself")
        if path.suffix == ".gguf" or _starts_with(path, _GGUF_MAGIC):
            return cls.from_gguf(path)
        raise TokenizerLoadError(f"{path} is neither a GGUF file nor a model directory with tokenizer.json")

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        return cls(read_gguf_tokenizer(path))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        return cls(read_hf_tokenizer(path))

    # -- text and ids ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings in it (``<|im_start|>``) become their ids.

        A long text is cut where no token can span and its pieces encoded in parallel.
        """
        if self._cuttable and len(text) >= PARALLEL_MIN_CHARS:
            return self._encode_in_pieces(text, add_special_tokens, _PARALLEL_PIECES)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def _encode_in_pieces(self, text: str, add_special_tokens: bool, pieces: int) -> list[int]:
        encodings = self.backend.encode_batch_fast(cut(text, pieces) or [text], add_special_tokens=False)
        post = self.backend.post_processor
        if add_special_tokens and post is not None and post.num_special_tokens_to_add(False):
            return self.backend.post_process(Encoding.merge(encodings, growing_offsets=True)).ids
        return [i for encoding in encodings for i in encoding.ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_prompt(self, text: str) -> list[int]:
        """The ids of a raw completion prompt, as ``transformers_tokenizer(text)`` gives them."""
        return self.encode(text, add_special_tokens=True)

    # -- chat ------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        """False for a base model: it takes raw completion prompts only."""
        return bool(self.chat_template)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt text for a conversation, rendered by the model's own chat template.

        Raises ChatTemplateMissing for a model without one and ChatTemplateError when the
        template refuses the conversation.
        """
        return self._chat_template().render(messages, add_generation_prompt=add_generation_prompt,
                                            special_tokens=self._specials(), **kwargs)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, *,
                    sanitize_control_tokens: bool = False, **kwargs: Any) -> list[int]:
        """The ids of a conversation, as transformers' ``apply_chat_template(tokenize=True)`` gives them.

        With ``sanitize_control_tokens`` a control token inside user-supplied text (say a
        ``<|im_start|>system`` in a message) is encoded as plain text, so users cannot forge
        turns; only the template's own control tokens become control ids. Raises
        UnsanitizableText when the vocabulary would make the token from plain text anyway.
        """
        if not sanitize_control_tokens:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                               add_special_tokens=False)
        template = self._chat_template()
        marker = self._control_marker(template)
        rendered = template.render(marker.mark(list(messages)), add_generation_prompt=add_generation_prompt,
                                   special_tokens=self._specials(),
                                   **{k: marker.mark(v) for k, v in kwargs.items()})
        return marker.encode(rendered, lambda text: self.encode(text, add_special_tokens=False),
                             self._encode_as_text, self.token_to_id)

    def _chat_template(self) -> ChatTemplate:
        if not self.chat_template:
            raise ChatTemplateMissing(
                "this model has no chat template (it is a base model, not an instruct one): send the text as a raw "
                "completion prompt instead (POST /v1/completions, or `mesh generate --raw`)"
            )
        if self._template is None:
            self._template = ChatTemplate(self.chat_template)
        return self._template

    def _specials(self) -> dict[str, str | None]:
        return {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                "pad_token": self.pad_token}

    def _control_marker(self, template: ChatTemplate) -> ControlTokenMarker:
        if self._marker is None:
            literals = template.literal_text()
            self._marker = ControlTokenMarker(
                token.content for token in self.backend.get_added_tokens_decoder().values()
                if token.special or (token.content in literals and not token.content.isspace()))
        return self._marker

    def _encode_as_text(self, text: str) -> list[int]:
        """``text`` through the normalizer, split and model alone: no added token is matched."""
        backend = self.backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        splits = [text] if backend.pre_tokenizer is None else [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        return [token.id for split in splits for token in backend.model.tokenize(split)]

    def _stop_ids(self, extra: Sequence[int]) -> tuple[int, ...]:
        ids: list[int] = []
        if self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        ids.extend(int(i) for i in extra)
        for marker in _END_OF_TURN_MARKERS:
            if self.chat_template and marker in self.chat_template:
                token_id = self.backend.token_to_id(marker)
                if token_id is not None:
                    ids.append(token_id)
        return tuple(dict.fromkeys(ids))


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError as exc:
        raise TokenizerLoadError(f"cannot read {path}: {exc}") from None
