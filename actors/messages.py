"""Typed messages: `@message` dataclasses in a registry, encoded with msgpack. Never pickle.

    @message("mesh.Heartbeat")
    @dataclass
    class Heartbeat:
        term: int
        hidden: np.ndarray | None = None

Fields may be int/float/str/bytes/bool/None, lists, dicts, nested registered messages
and tensors (numpy, torch, MLX). Decoding checks the type name against the registry
and each field against its annotation; anything else is a typed `CodecError`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, TypeVar

import numpy as np

from .errors import LimitExceeded, MessageFieldError, UnknownMessageType
from .tensors import is_tensor

T = TypeVar("T")
_REGISTRY: dict[str, type] = {}


def message(type_name: str) -> Callable[[type[T]], type[T]]:
    """Register a dataclass as a wire message under a stable, unique type name."""
    if not isinstance(type_name, str) or not type_name or len(type_name) > 200:
        raise ValueError("a message type name is a non-empty string of at most 200 chars")

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            cls = dataclasses.dataclass(cls)
        existing = _REGISTRY.get(type_name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"message type {type_name!r} is already registered by {existing!r}")
        cls.__message_type__ = type_name  # type: ignore[attr-defined]
        cls.__message_fields__ = None  # type: ignore[attr-defined]  # resolved lazily
        _REGISTRY[type_name] = cls
        return cls

    return register


def registered_types() -> dict[str, type]:
    """A copy of the registry: type name -> class."""
    return dict(_REGISTRY)


def type_name(obj: Any) -> str | None:
    return getattr(type(obj), "__message_type__", None)


def lookup(name: str) -> type:
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UnknownMessageType(f"message type {name!r} is not registered here; is the sender a newer version?")
    return cls


def fields_of(cls: type) -> list[tuple[str, Any, bool]]:
    """[(name, type hint, has_default)] in declaration order, resolved once."""
    cached = cls.__dict__.get("__message_fields__")
    if cached is not None:
        return cached
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable forward reference: check nothing rather than crash
        hints = {}
    out = []
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        out.append((f.name, hints.get(f.name, Any), has_default))
    cls.__message_required__ = sum(1 for _, _, d in out if not d)  # type: ignore[attr-defined]
    cls.__message_fields__ = out  # type: ignore[attr-defined]
    return out


def field_values(obj: Any) -> list[Any]:
    return [getattr(obj, name) for name, _, _ in fields_of(type(obj))]


def build(name: str, values: Any, max_depth: int, depth: int) -> Any:
    """Instantiate message `name` from wire values, checking every field."""
    cls = lookup(name)
    if not isinstance(values, list):
        raise MessageFieldError(f"{name}: fields must be a list")
    spec = fields_of(cls)
    if len(values) > len(spec) or len(values) < cls.__message_required__:
        raise MessageFieldError(f"{name}: expected {len(spec)} fields, got {len(values)}")
    kwargs = {}
    for (fname, hint, _), value in zip(spec, values):
        if not check_value(value, hint, max_depth, depth):
            raise MessageFieldError(f"{name}.{fname}: {type(value).__name__} does not match {hint}")
        kwargs[fname] = value
    try:
        return cls(**kwargs)
    except Exception as exc:  # __post_init__ validation of the user's class
        raise MessageFieldError(f"{name}: {exc}") from None


def check_depth(value: Any, max_depth: int, depth: int) -> None:
    if depth > max_depth:
        raise LimitExceeded(f"message nesting deeper than {max_depth}")
    if isinstance(value, list):
        for v in value:
            check_depth(v, max_depth, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            check_depth(v, max_depth, depth + 1)


def check_value(value: Any, hint: Any, max_depth: int, depth: int) -> bool:
    """Does a decoded value fit a field annotation? Raises LimitExceeded when too deep."""
    if depth > max_depth:
        raise LimitExceeded(f"message nesting deeper than {max_depth}")
    if hint is Any or hint is object:
        check_depth(value, max_depth, depth)
        return True
    if hint is int:
        return type(value) is int
    if hint is str:
        return type(value) is str
    if hint is float:
        return type(value) in (float, int)
    if hint is bool:
        return type(value) is bool
    if hint is bytes:
        return type(value) is bytes
    if hint is None or hint is type(None):
        return value is None
    if hint is np.ndarray:
        return is_tensor(value)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(check_value(value, h, max_depth, depth) for h in typing.get_args(hint))
    if origin is np.ndarray:
        return is_tensor(value)
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, list):
            return False
        args = typing.get_args(hint)
        item = args[0] if args and (origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)) else Any
        return all(check_value(v, item, max_depth, depth + 1) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        args = typing.get_args(hint) or (Any, Any)
        return all(
            check_value(k, args[0], max_depth, depth + 1) and check_value(v, args[1], max_depth, depth + 1)
            for k, v in value.items()
        )
    if isinstance(hint, type) and hasattr(hint, "__message_type__"):
        return isinstance(value, hint)
    if isinstance(hint, type) and type(value).__module__ == "builtins":
        return isinstance(value, hint)
    check_depth(value, max_depth, depth)  # an annotation we do not model: accept, bounded
    return True
