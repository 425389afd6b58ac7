"""Tokenizer and chat template read from the model files, and incremental detokenization.

A model's tokenizer comes either from GGUF metadata (``tokenizer.ggml.*``) or from a
Hugging Face directory (``tokenizer.json`` + ``tokenizer_config.json``). Both are built on
the HF ``tokenizers`` library, so ids are the ones transformers produces for the same files.

For a GGUF byte-level vocabulary (``tokenizer.ggml.model == "gpt2"``) we build what
transformers' GGUF converter builds: a BPE over the byte alphabet, the GPT-2 ``ByteLevel``
pre-tokenizer (or an explicit split regex for the ``pre`` types transformers knows), a
``ByteLevel`` decoder, the tokens the file marks CONTROL added whole as special tokens and
those marked USER_DEFINED added whole as plain tokens.

Chat templates are rendered in a sandboxed jinja2 environment set up the way transformers
sets its own up (trim_blocks, lstrip_blocks, ``raise_exception``, a ``tojson`` that does
not escape HTML, ``strftime_now``, loop controls), since templates from model files are
untrusted code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from kernels.gguf import GGUF_MAGIC, open_gguf

__all__ = ["Tokenizer", "IncrementalDetokenizer", "TokenizerLoadError", "ChatTemplateMissing"]


class TokenizerLoadError(ValueError):
    """The model files do not describe a tokenizer we can build."""


class ChatTemplateMissing(ValueError):
    """The model ships no chat template; use plain completion (``encode``) instead."""


# GGUF token types (llama.cpp's llama_token_type).
_CONTROL = 3
_USER_DEFINED = 4

# Markers that end an assistant turn in common chat templates. Generation stops on the ones
# the model's own template writes, besides the declared EOS.
_END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")

# Split regexes for GGUF `tokenizer.ggml.pre` values whose split differs from GPT-2's, as in
# transformers' GGUF converter; any other value (including "smollm", "gpt2", "default") keeps
# the GPT-2 ByteLevel regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codepoints)))


# ---------------------------------------------------------------------------------------------
# Chat templates


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja namespace that refuses underscore attributes (no path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja's
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


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which chat templates never want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types so the sandbox sees no foreign methods."""
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
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return f"<{type(value).__name__}>"


# ---------------------------------------------------------------------------------------------


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> token ids for one model, and its chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self.bos_token_id: int | None = self.token_to_id(bos_token)
        self.eos_token_id: int | None = self.token_to_id(eos_token)
        self.eos_token_ids: tuple[int, ...] = self._stop_ids(extra_eos_token_ids)

    # -- loading -----------------------------------------------------------------------------

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
            raise TokenizerLoadError(f"{path} has no tokenizer.json and not exactly one .gguf file")
        if path.suffix == ".gguf" or _starts_with(path, GGUF_MAGIC):
            return cls.from_gguf(path)
        raise TokenizerLoadError(f"{path} is neither a GGUF file nor a model directory with tokenizer.json")

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        meta = open_gguf(path).metadata
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerLoadError(
                f"{path}: GGUF tokenizer type {kind!r} is not supported yet (only byte-level BPE, 'gpt2'); "
                "use the model's Hugging Face directory with tokenizer.json instead"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]

        alphabet = _bytes_to_unicode()
        spelled = set(alphabet.values())
        # A byte-level vocabulary spells every token in the byte alphabet; a token written in
        # plain text (some converters do this) is respelled so its merges still line up.
        vocab = {
            (t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
            for i, t in enumerate(tokens)
        }
        backend = BackendTokenizer(
            BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                fuse_unk=False)
        )
        split = _GGUF_PRE_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        backend.decoder = decoders.ByteLevel()

        # Control tokens stay whole and are special; one spelled outside the byte alphabet is a
        # converter mislabel and is left alone, as transformers does.
        control = [t for t, k in zip(tokens, token_types) if k == _CONTROL and set(t) <= spelled]
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
        user = [t for t, k in zip(tokens, token_types) if k == _USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

        def token_at(key: str) -> str | None:
            index = meta.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        bos, eos = token_at("bos_token_id"), token_at("eos_token_id")
        _set_post_processor(
            backend,
            bos if meta.get("tokenizer.ggml.add_bos_token", False) else None,
            eos if meta.get("tokenizer.ggml.add_eos_token", False) else None,
        )
        extra = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            unk_token=token_at("unknown_token_id"),
            pad_token=token_at("padding_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
            extra_eos_token_ids=extra,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        generation = _read_json(path / "generation_config.json")
        eos_ids = generation.get("eos_token_id")
        extra = eos_ids if isinstance(eos_ids, list) else ([eos_ids] if isinstance(eos_ids, int) else [])
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            unk_token=_token_content(config.get("unk_token")),
            pad_token=_token_content(config.get("pad_token")),
            chat_template=template,
            extra_eos_token_ids=extra,
        )

    # -- encoding ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS only where the model asks for them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for a conversation, rendered by the model's own chat template."""
        if not self.chat_template:
            raise ChatTemplateMissing("this model has no chat template; send a plain completion prompt instead")
        template = _compile_chat_template(self.chat_template)
        context = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "tools": None,
            "documents": None,
            **kwargs,
        }
        return template.render(messages=_plain(list(messages)), add_generation_prompt=add_generation_prompt,
                               **_plain(context))

    def _stop_ids(self, extra: Iterable[int]) -> tuple[int, ...]:
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
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _set_post_processor(backend: BackendTokenizer, bos: str | None, eos: str | None) -> None:
    single, pair, special = "$A", "$A $B:1", []
    if bos is not None:
        single, pair = f"{bos} {single}", f"{bos} $A {bos}:1 $B:1"
        special.append((bos, backend.token_to_id(bos)))
    if eos is not None:
        single, pair = f"{single} {eos}", f"{pair} {eos}:1"
        if eos != bos:
            special.append((eos, backend.token_to_id(eos)))
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


class IncrementalDetokenizer:
    """Turn a stream of token ids into text, never ending in a broken UTF-8 sequence.

    A multi-byte character (an emoji, CJK) can be split over several byte tokens. Each
    ``feed`` decodes a small window of recent tokens and returns only the text that is
    complete; bytes of an unfinished character are held back until the tokens that finish
    it arrive. ``"".join(feeds) + flush() == tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        # Text of _ids[_prefix:_read] is already emitted; it is re-decoded as context so
        # decoders that treat the first token specially (leading space) stay consistent.
        self._prefix = 0
        self._read = 0

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def feed(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        emitted = self._tokenizer.decode(self._ids[self._prefix:self._read], self._skip)
        window = self._tokenizer.decode(self._ids[self._prefix:], self._skip)
        if len(window) > len(emitted) and not window.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return window[len(emitted):]
        return ""

    def flush(self) -> str:
        """The held-back text (replacement characters for bytes that never completed)."""
        emitted = self._tokenizer.decode(self._ids[self._prefix:self._read], self._skip)
        window = self._tokenizer.decode(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return window[len(emitted):]

