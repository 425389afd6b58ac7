"""Sans-IO connection handshake: cluster secret, Ed25519 identities, session keys.

    I -> R  hello   {v, body, mac}   body = msgpack{eph_i, nonce_i, pub_i, listen_i, ciphers_i, ts_ms}
                                     mac  = BLAKE3-keyed(mk, body)      mk = BLAKE3-derive(secret, "hello mac")
    R -> I  accept  {eph_r, nonce_r, pub_r, cipher, sig_r}    sig_r = Sign_r("R" | th)
    I -> R  prove   {proof_i, sig_i}                      sig_i = Sign_i("I" | th | proof_i)
    R -> I  welcome {proof_r}          (or `refuse` when proof_i is wrong)

    th  = BLAKE3(hello bytes | eph_r | nonce_r | pub_r | cipher)   binds keys, nonces, cipher
    K   = BLAKE3-keyed(psk, X25519(eph_i, eph_r) | th)      psk = BLAKE3-derive(secret)
    proof_i, proof_r, key_i2r, key_r2i = BLAKE3-keyed(K, label)   key labels name the cipher

The responder's work before authentication is cheap, as in WireGuard: before any X25519
or Ed25519 operation (before it even makes its ephemeral key) it checks, in this order,
- the hello's MAC, keyed by a key derived from the cluster secret: a stranger's hello
  costs one BLAKE3 of ~200 bytes and is refused with `refuse secret`;
- its timestamp, within FRESHNESS_S of our wall clock (`refuse stale` names the skew);
- a `ReplayGuard` shared by the node's handshakes: each hello is accepted once in the
  window, so a captured hello replayed costs a dict lookup, not a DH and a signature.
So only a holder of the secret makes a responder do public-key work (and then only
once per fresh hello). The MAC is no proof of identity; the proofs and signatures are.

The record cipher is negotiated: the initiator offers its list (`ciphers.supported()`:
AES-256-GCM first when the CPU has AES instructions, ChaCha20-Poly1305 always) and the
responder picks its most preferred one that was offered. The offer is inside the hello
bytes and the pick inside th, both signed, so a man in the middle cannot change either.

The responder proves nothing before it has checked the initiator's proof, so a peer
that dials in without the secret receives no value computed from it (the hello MAC is
checked, never sent). Each proof is a keyed hash over fresh ephemeral DH output, so a
captured proof reveals nothing either (for a high-entropy secret, which `--secret-file`
should hold).

Frames are `u32 length | msgpack map`, at most 4 KiB.
"""

from __future__ import annotations

import hmac
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3
import msgpack
from nacl.bindings import crypto_scalarmult
from nacl.public import PrivateKey

from . import ciphers
from .errors import ClusterSecretMismatch, HandshakeError, HelloRefused, HelloSecretMismatch
from .identity import NodeIdentity, node_id_of

MAX_FRAME = 4096
_U32 = struct.Struct("<I")
VERSION = 3  # 2: the record cipher is negotiated; 3: the hello carries a timestamp and a MAC
FRESHNESS_S = 120.0  # a hello's timestamp may differ from the responder's wall clock by this much
MAC_SIZE = 32
MAX_HELLO_BODY = 1024
DIR_I2R = b"I2R\x00"
DIR_R2I = b"R2I\x00"


@dataclass(frozen=True)
class HandshakeResult:
    peer_public_key: bytes
    peer_node_id: str
    peer_listen: tuple[str, int] | None
    send_key: bytes
    recv_key: bytes
    send_direction: bytes  # 4-byte nonce prefix of our frames
    recv_direction: bytes
    cipher: str  # record cipher both sides agreed on (`actors.ciphers`)
    leftover: bytes  # bytes that followed the handshake (already encrypted frames)


def derive_psk(cluster_secret: bytes) -> bytes:
    return blake3.blake3(cluster_secret, derive_key_context="mesh actors cluster secret v1").digest()


def derive_mac_key(cluster_secret: bytes) -> bytes:
    """The hello MAC's key: derived apart from the psk, so a MAC never reveals psk material."""
    return blake3.blake3(cluster_secret, derive_key_context="mesh actors hello mac v1").digest()


class ReplayGuard:
    """The MACs of the hellos a node accepted recently: each hello is accepted once.

    Shared by every responder handshake of a node. Only hellos with a valid MAC enter it
    (strangers cannot fill it). An entry lives 2 x FRESHNESS_S, longer than any hello it
    could match stays fresh; past `max_entries` (a secret holder flooding us) the oldest
    go first.
    """

    def __init__(self, window: float = FRESHNESS_S, max_entries: int = 65536) -> None:
        self.window = window
        self.max_entries = max_entries
        self._expiry: dict[bytes, float] = {}  # insertion order is expiry order

    def __len__(self) -> int:
        return len(self._expiry)

    def first_use(self, mac: bytes, now: float) -> bool:
        """True (and remembered) the first time `mac` is seen within the window."""
        expiry = self._expiry
        while expiry:
            oldest = next(iter(expiry))
            if expiry[oldest] > now and len(expiry) < self.max_entries:
                break
            del expiry[oldest]
        if mac in expiry:
            return False
        expiry[mac] = now + 2 * self.window
        return True


def _kdf(key: bytes, label: bytes) -> bytes:
    return blake3.blake3(label, key=key).digest()


def _frame(obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _U32.pack(len(body)) + body


class Handshake:
    """One side of the handshake. Feed it bytes; send what it returns; read `result`.

    Raises HandshakeError (or ClusterSecretMismatch). When it raises, `farewell`
    holds bytes to send to the peer before closing (a refusal), or is empty.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        cluster_secret: bytes,
        initiator: bool,
        listen: tuple[str, int] | None = None,
        ciphers_offered: tuple[str, ...] | None = None,
        *,
        replay: ReplayGuard | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self._ciphers = ciphers.check_names(ciphers_offered) if ciphers_offered else ciphers.supported()
        self._cipher = ""
        self.initiator = initiator
        self.result: HandshakeResult | None = None
        self.farewell = b""
        self.peer_node_id: str | None = None
        self._secret = cluster_secret
        self._mac_key = derive_mac_key(cluster_secret)
        self._replay = replay if replay is not None else ReplayGuard()
        self._wall = wall
        # The initiator's ephemeral key now; the responder's only once a hello is authentic.
        self._eph: PrivateKey | None = PrivateKey.generate() if initiator else None
        self._nonce = os.urandom(32)
        self._listen = listen
        self._buf = bytearray()
        self._state = "start" if initiator else "wait_hello"
        self._hello = b""
        self._th = b""
        self._k = b""

    def start(self) -> bytes:
        """The initiator's first frame."""
        if self._state != "start":
            raise HandshakeError("start() is for the initiator, once")
        body = msgpack.packb(
            {
                "eph": bytes(self._own_eph().public_key),
                "nonce": self._nonce,
                "pub": self.identity.public_key,
                "listen": list(self._listen) if self._listen else None,
                "ciphers": list(self._ciphers),
                "ts_ms": int(self._wall() * 1000),
            },
            use_bin_type=True,
        )
        mac = blake3.blake3(body, key=self._mac_key).digest()
        frame = _frame({"t": "hello", "v": VERSION, "body": body, "mac": mac})
        self._hello = frame
        self._state = "wait_accept"
        return frame

    @property
    def done(self) -> bool:
        return self.result is not None

    def receive_data(self, data: bytes) -> list[bytes]:
        """Consume peer bytes; return frames to send. Sets `result` when complete."""
        if self.result is not None:
            raise HandshakeError("handshake already complete")
        self._buf += data
        out: list[bytes] = []
        while self.result is None:
            frame = self._next_frame()
            if frame is None:
                break
            raw, msg = frame
            out.extend(self._handle(raw, msg))
        return out

    def _next_frame(self) -> tuple[bytes, dict[str, Any]] | None:
        if len(self._buf) < 4:
            return None
        (length,) = _U32.unpack_from(self._buf, 0)
        if length > MAX_FRAME:
            raise HandshakeError(f"handshake frame of {length} bytes; is the peer a mesh node?")
        if len(self._buf) < 4 + length:
            return None
        raw = bytes(self._buf[: 4 + length])
        del self._buf[: 4 + length]
        try:
            msg = msgpack.unpackb(raw[4:], raw=False, max_bin_len=1024, max_str_len=1024, max_array_len=16, max_map_len=16)
        except Exception as exc:
            raise HandshakeError(f"malformed handshake frame: {type(exc).__name__}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
            raise HandshakeError("malformed handshake frame")
        return raw, msg

    @staticmethod
    def _bytes(msg: dict[str, Any], key: str, size: int) -> bytes:
        value = msg.get(key)
        if not isinstance(value, bytes) or len(value) != size:
            raise HandshakeError(f"handshake field {key!r} must be {size} bytes")
        return value

    def _own_eph(self) -> PrivateKey:
        if self._eph is None:
            raise HandshakeError("no ephemeral key yet: the responder makes one for an authentic hello")
        return self._eph

    def _derive(self, eph_i: bytes, eph_r: bytes) -> None:
        own_peer = eph_r if self.initiator else eph_i
        shared = crypto_scalarmult(bytes(self._own_eph()), own_peer)
        if shared == bytes(32):
            raise HandshakeError("peer sent a low-order ephemeral key")
        self._k = blake3.blake3(shared + self._th, key=derive_psk(self._secret)).digest()

    def _authentic_hello(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The hello's body if its MAC, its timestamp and its novelty hold; no DH, no signature."""
        body, mac = msg.get("body"), msg.get("mac")
        if not (isinstance(body, bytes) and len(body) <= MAX_HELLO_BODY and isinstance(mac, bytes)
                and len(mac) == MAC_SIZE):
            raise HandshakeError("malformed hello: it needs a body and a 32-byte mac")
        if not hmac.compare_digest(blake3.blake3(body, key=self._mac_key).digest(), mac):
            self.farewell = _frame({"t": "refuse", "reason": "secret"})
            raise HelloSecretMismatch(
                "a peer sent a hello that is not keyed by our cluster secret (a stranger, or another "
                "cluster's node); check --secret-file on both machines"
            )
        try:
            inner = msgpack.unpackb(body, raw=False, max_bin_len=1024, max_str_len=1024, max_array_len=16,
                                    max_map_len=16)
        except Exception as exc:
            raise HandshakeError(f"malformed hello body: {type(exc).__name__}") from None
        if not isinstance(inner, dict) or type(inner.get("ts_ms")) is not int:
            raise HandshakeError("malformed hello body")
        now = self._wall()
        skew = inner["ts_ms"] / 1000 - now
        if abs(skew) > FRESHNESS_S:
            self.farewell = _frame({"t": "refuse", "reason": f"stale hello: our clocks differ by {skew:+.0f} s "
                                                             f"(at most {FRESHNESS_S:.0f}); set both clocks (NTP)"})
            raise HelloRefused("stale", f"a hello {skew:+.0f} s off our clock (at most {FRESHNESS_S:.0f} s): "
                                        "a replay, or a peer whose clock is wrong; set both clocks (NTP)")
        if not self._replay.first_use(mac, now):
            raise HelloRefused("replay", "a hello we accepted before arrived again: a replay")
        return inner

    def _handle(self, raw: bytes, msg: dict[str, Any]) -> list[bytes]:
        kind = msg["t"]
        if kind == "refuse":
            reason = msg.get("reason")
            peer = self.peer_node_id or "?"
            if reason == "secret":
                raise ClusterSecretMismatch(
                    f"peer {peer} refused our handshake: it does not share our cluster secret; "
                    "check --secret-file on both machines"
                )
            raise HandshakeError(f"peer {peer} refused our handshake: {str(reason)[:100]}")
        if self._state == "wait_hello" and kind == "hello":
            if msg.get("v") != VERSION:
                self.farewell = _frame({"t": "refuse", "reason": "version"})
                raise HandshakeError(f"peer speaks handshake version {msg.get('v')!r}, we speak {VERSION}")
            msg = self._authentic_hello(msg)
            eph_i = self._bytes(msg, "eph", 32)
            self._bytes(msg, "nonce", 32)
            pub_i = self._bytes(msg, "pub", 32)
            listen = msg.get("listen")
            if listen is not None and not (
                isinstance(listen, list) and len(listen) == 2 and isinstance(listen[0], str) and type(listen[1]) is int
            ):
                raise HandshakeError("handshake field 'listen' must be [host, port]")
            offered = msg.get("ciphers")
            if not (isinstance(offered, list) and all(isinstance(c, str) for c in offered)):
                raise HandshakeError("handshake field 'ciphers' must be a list of cipher names")
            self._peer_pub, self._peer_listen, self._eph_i = pub_i, listen, eph_i
            self.peer_node_id = node_id_of(pub_i)
            chosen = ciphers.choose(self._ciphers, offered)
            if chosen is None:
                self.farewell = _frame({"t": "refuse", "reason": f"no common cipher; we run {list(self._ciphers)}"})
                raise HandshakeError(
                    f"peer {self.peer_node_id} offers ciphers {offered[:4]!r}, we run {list(self._ciphers)}; "
                    "allow chacha20poly1305 on both nodes"
                )
            self._cipher = chosen
            self._eph = PrivateKey.generate()
            eph_r = bytes(self._eph.public_key)
            self._th = blake3.blake3(raw + eph_r + self._nonce + self.identity.public_key + chosen.encode()).digest()
            self._derive(eph_i, eph_r)
            self._state = "wait_prove"
            sig = self.identity.sign(b"R" + self._th)
            return [_frame({"t": "accept", "eph": eph_r, "nonce": self._nonce, "pub": self.identity.public_key,
                            "cipher": chosen, "sig": sig})]
        if self._state == "wait_accept" and kind == "accept":
            eph_r = self._bytes(msg, "eph", 32)
            nonce_r = self._bytes(msg, "nonce", 32)
            pub_r = self._bytes(msg, "pub", 32)
            sig_r = self._bytes(msg, "sig", 64)
            chosen = msg.get("cipher")
            self.peer_node_id = node_id_of(pub_r)
            if chosen not in self._ciphers:
                raise HandshakeError(f"peer {self.peer_node_id} picked cipher {str(chosen)[:40]!r}, which we did not offer")
            self._cipher = chosen
            self._th = blake3.blake3(self._hello + eph_r + nonce_r + pub_r + chosen.encode()).digest()
            if not NodeIdentity.verify(pub_r, b"R" + self._th, sig_r):
                raise HandshakeError(f"peer {self.peer_node_id} sent a bad signature")
            self._peer_pub, self._peer_listen = pub_r, None
            self._derive(bytes(self._own_eph().public_key), eph_r)
            proof = _kdf(self._k, b"proof initiator")
            sig = self.identity.sign(b"I" + self._th + proof)
            self._state = "wait_welcome"
            return [_frame({"t": "prove", "proof": proof, "sig": sig})]
        if self._state == "wait_prove" and kind == "prove":
            proof = self._bytes(msg, "proof", 32)
            sig_i = self._bytes(msg, "sig", 64)
            if not hmac.compare_digest(proof, _kdf(self._k, b"proof initiator")):
                self.farewell = _frame({"t": "refuse", "reason": "secret"})
                raise ClusterSecretMismatch(
                    f"peer {self.peer_node_id} does not share our cluster secret; "
                    "check --secret-file on both machines"
                )
            if not NodeIdentity.verify(self._peer_pub, b"I" + self._th + proof, sig_i):
                raise HandshakeError(f"peer {self.peer_node_id} sent a bad signature")
            self._finish()
            return [_frame({"t": "welcome", "proof": _kdf(self._k, b"proof responder")})]
        if self._state == "wait_welcome" and kind == "welcome":
            proof = self._bytes(msg, "proof", 32)
            if not hmac.compare_digest(proof, _kdf(self._k, b"proof responder")):
                raise ClusterSecretMismatch(
                    f"peer {self.peer_node_id} does not share our cluster secret; "
                    "check --secret-file on both machines"
                )
            self._finish()
            return []
        raise HandshakeError(f"unexpected handshake frame {kind!r} in state {self._state}")

    def _finish(self) -> None:
        suite = self._cipher.encode()
        i2r, r2i = _kdf(self._k, b"key i2r " + suite), _kdf(self._k, b"key r2i " + suite)
        listen = tuple(self._peer_listen) if self._peer_listen else None
        self.result = HandshakeResult(
            peer_public_key=self._peer_pub,
            peer_node_id=node_id_of(self._peer_pub),
            peer_listen=listen,  # type: ignore[arg-type]
            send_key=i2r if self.initiator else r2i,
            recv_key=r2i if self.initiator else i2r,
            send_direction=DIR_I2R if self.initiator else DIR_R2I,
            recv_direction=DIR_R2I if self.initiator else DIR_I2R,
            cipher=self._cipher,
            leftover=bytes(self._buf),
        )
        self._buf = bytearray()
        self._state = "done"
