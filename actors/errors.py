"""Typed errors of the actor runtime. Each says what went wrong and what to do."""

from __future__ import annotations


class ActorsError(Exception):
    """Base class of every error raised by `actors`."""


class AskTimeout(ActorsError, TimeoutError):
    """An `ask` got no reply within its timeout."""


class ActorDead(ActorsError):
    """The target actor is stopped or was never spawned; the message was not delivered."""


class MailboxFull(ActorsError):
    """`tell` found the bounded mailbox (or a peer's send buffer) full; retry later or use `await ref.send()`."""


class PeerUnreachable(ActorsError):
    """No connection to the node that hosts the target actor (never connected, down, or reconnecting)."""


class HandlerError(ActorsError):
    """The target actor's handler raised while serving an ask (locally or on another node).

    `kind` is the exception's class name, `text` its message; the actor itself was
    handed to its supervisor.
    """

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(f"{kind}: {text}")
        self.kind = kind
        self.text = text


class CodecError(ActorsError):
    """A frame or message could not be encoded or decoded. The connection that sent it is closed."""


class FrameTooLarge(CodecError):
    """A frame exceeds the configured size limit."""


class LimitExceeded(CodecError):
    """A message exceeds a hard limit (nesting depth, string/bytes length, tensor count, ...)."""


class UnknownMessageType(CodecError):
    """The message's type name is not in the registry of this process."""


class MessageFieldError(CodecError):
    """A message has missing, extra or wrongly typed fields."""


class HandshakeError(ActorsError):
    """The connection handshake failed (protocol error, bad signature, timeout)."""


class ClusterSecretMismatch(HandshakeError):
    """The peer does not know our cluster secret (or we do not know its one)."""


class HelloRefused(HandshakeError):
    """A responder refused a hello before doing any key agreement: `reason` is "secret" (its
    MAC is not keyed by our cluster secret), "stale" (its timestamp is too far from our
    clock), "replay" (we accepted that very hello already) or "busy" (too many pending)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


class HelloSecretMismatch(HelloRefused, ClusterSecretMismatch):
    """A hello whose MAC is not keyed by our cluster secret: a stranger, or a wrong --secret-file."""

    def __init__(self, text: str) -> None:
        super().__init__("secret", text)


class ReplayError(ActorsError):
    """A frame arrived with a counter that was already used or is out of order: replayed or reordered."""


class DecryptError(ActorsError):
    """A frame failed authentication: it was altered on the way or encrypted with another key."""
