"""actors: a small asyncio actor runtime with an authenticated, encrypted msgpack transport.

Knows nothing of models. Never imports `mesh` or `kernels`; torch/MLX are imported
lazily, only to convert tensors of those kinds.

Quick tour
----------

    import numpy as np
    from dataclasses import dataclass
    from actors import Actor, ActorSystem, NodeIdentity, message

    @message("demo.Add")              # stable wire name, unique per process
    @dataclass
    class Add:
        x: np.ndarray
        y: float = 1.0

    class Adder(Actor):
        async def receive(self, msg, ctx):
            return msg.x + msg.y       # the return value answers an ask

    secret = open("secret", "rb").read()                      # same on every node
    a = ActorSystem(NodeIdentity.load_or_create("state/a"), secret)
    b = ActorSystem(NodeIdentity.generate(), secret)          # transport=TcpTransport() by default
    await a.start("127.0.0.1", 0); await b.start("127.0.0.1", 0)   # a.address == (host, port)
    a.spawn(Adder(), name="adder")
    peer = await b.connect(*a.address)                         # dial + handshake -> a.node_id
    ref = b.ref(peer, "adder")                                 # location-transparent ActorRef
    out = await ref.ask(Add(np.ones(3, np.float32)), timeout=2.0)   # -> array([2., 2., 2.])
    ref.tell(Add(np.zeros(1)))                                 # fire and forget
    await b.stop(); await a.stop()

Public API
----------
- `ActorSystem(identity, cluster_secret: bytes, transport=None, *, limits=Limits(),
  mailbox_size=1000, heartbeat_interval=1.0, heartbeat_timeout=5.0,
  handshake_timeout=5.0, reconnect=True, backoff=(0.05, 5.0), max_send_buffer=64 MiB,
  ciphers=None, max_pending_handshakes=64)` (record ciphers offered, most preferred first; default
  `ciphers.supported()`: AES-256-GCM when the CPU has AES instructions, then ChaCha20-Poly1305;
  inbound handshakes not yet complete are capped, a quarter of them per remote host)
  - `await start(host="127.0.0.1", port=0) -> (host, port)`; `address`; `node_id`;
    `await stop()`.
  - `spawn(actor_or_factory, name=None, *, mailbox_size=None, max_restarts=3,
    within=5.0) -> ActorRef` (top-level actors are restarted on a crash, at most
    `max_restarts` times in `within` s, then stopped for good);
    `await stop_actor(ref)`; `ref(node_id, name) -> ActorRef`.
  - `await connect(host, port) -> peer node id` (redialed with exponential backoff
    whenever the link drops); `disconnect(node_id)`; `peers() -> {node_id: (host, port)}`;
    `cipher_of(node_id)` (the record cipher negotiated with that peer).
  - Peer up/down: `on_peer(callback)` with `PeerEvent(node_id, address, up, reason)`,
    or `async for event in system.peer_events(): ...`.
  - `watch(ref, callback)`: `callback(Terminated(node_id, name, reason))` once when
    the actor stops for good, or its node goes down.
- `ActorRef`: `tell(msg)`, `await send(msg)` (tell with backpressure),
  `await ask(msg, timeout=5.0)`, `node_id`, `name`, `path`.
- `Actor`: `async def receive(self, msg, ctx)` (its return value is the reply), optional
  `on_start(ctx)` / `on_stop(ctx)`. `Context`: `system`, `self_ref`, `sender`,
  `watch(ref)` (delivers `Terminated` to the mailbox), `stop()`.
- `Supervisor(children=[ChildSpec(name, factory)], strategy="one_for_one"|"one_for_all",
  max_restarts=3, within=5.0)`: spawn it like any actor; past its intensity it
  escalates to its parent.
- `@message("type.Name")` dataclasses: fields int/float/str/bytes/bool/None, lists,
  dicts, nested messages, tensors (numpy, torch, MLX; float16 and bfloat16 included).
- `NodeIdentity.load_or_create(state_dir)` (Ed25519 key in `node.key`, mode 0600),
  `NodeIdentity.generate()`, `.node_id` (16 hex chars of BLAKE3(public key)).
- Transports: `TcpTransport()`, `MemoryNetwork(delay, loss, seed).transport(name)`
  with `partition`, `heal`, `crash`, `revive`.
- Sans-IO building blocks: `codec.encode/decode/encode_frame/FrameDecoder` with
  `Limits`; `handshake.Handshake`; `secure.SecureChannel`.
- Errors (`actors.errors`): AskTimeout, ActorDead, MailboxFull, PeerUnreachable,
  HandlerError(kind, text), CodecError > FrameTooLarge, LimitExceeded,
  UnknownMessageType, MessageFieldError; HandshakeError > ClusterSecretMismatch,
  HelloRefused(reason) (a hello refused before any key agreement);
  ReplayError; DecryptError.
- Logging: `actors.log.configure(format="console"|"json", level="INFO")`.

`run(main())` runs a coroutine on uvloop when it is installed.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, TypeVar

from . import ciphers, codec, errors, log
from .actor import Actor, ActorRef, Context
from .codec import Limits
from .envelopes import Terminated
from .errors import (
    ActorDead, ActorsError, AskTimeout, ClusterSecretMismatch, CodecError, DecryptError,
    FrameTooLarge, HandlerError, HandshakeError, HelloRefused, LimitExceeded, MailboxFull,
    MessageFieldError, PeerUnreachable, ReplayError, UnknownMessageType,
)
from .identity import NodeIdentity
from .messages import message, registered_types
from .supervision import ChildSpec, Escalated, Supervisor
from .system import ActorSystem, PeerEvent
from .transport import MemoryNetwork, TcpTransport, Transport

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on uvloop when installed."""
    try:
        import uvloop

        return uvloop.run(main)
    except ImportError:
        return asyncio.run(main)


__all__ = [
    "Actor", "ActorDead", "ActorRef", "ActorSystem", "ActorsError", "AskTimeout", "ChildSpec",
    "ClusterSecretMismatch", "CodecError", "Context", "DecryptError", "Escalated", "FrameTooLarge",
    "HandlerError", "HandshakeError", "HelloRefused", "LimitExceeded", "Limits", "MailboxFull", "MemoryNetwork",
    "MessageFieldError", "NodeIdentity", "PeerEvent", "PeerUnreachable", "ReplayError",
    "Supervisor", "TcpTransport", "Terminated", "Transport", "UnknownMessageType", "codec",
    "errors", "log", "message", "registered_types", "run",
]
