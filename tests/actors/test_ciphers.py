"""Record cipher negotiation: what two nodes agree on, that the pick is signed, and both ciphers over TCP."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from actors import ActorSystem, NodeIdentity, ciphers
from actors.errors import HandshakeError
from actors.handshake import Handshake

from actor_kit import SECRET
from test_security import Echo, _run

AES, CHACHA = ciphers.AES_GCM, ciphers.CHACHA


def _pair(offer_i: tuple[str, ...] | None, offer_r: tuple[str, ...] | None) -> tuple[Handshake, Handshake]:
    i = Handshake(NodeIdentity.generate(), SECRET, True, None, offer_i)
    r = Handshake(NodeIdentity.generate(), SECRET, False, None, offer_r)
    return i, r


@pytest.mark.parametrize(
    "offer_i, offer_r, agreed",
    [
        ((AES, CHACHA), (AES, CHACHA), AES),
        ((CHACHA, AES), (AES, CHACHA), AES),  # the responder's preference decides
        ((AES, CHACHA), (CHACHA,), CHACHA),  # a node without AES hardware
        ((CHACHA,), (AES, CHACHA), CHACHA),
        ((AES,), (AES,), AES),
    ],
)
def test_both_sides_agree_on_one_cipher_with_separate_keys(offer_i, offer_r, agreed) -> None:
    i, r = _pair(offer_i, offer_r)
    _run(i, r)
    assert i.result and r.result
    assert i.result.cipher == r.result.cipher == agreed
    assert i.result.send_key == r.result.recv_key != i.result.recv_key == r.result.send_key


def test_default_offer_is_what_the_machine_supports() -> None:
    i, r = _pair(None, None)
    _run(i, r)
    assert i.result and i.result.cipher == ciphers.supported()[0]
    assert ciphers.supported()[-1] == CHACHA  # the fallback every node has


def test_no_common_cipher_is_refused_on_both_sides() -> None:
    i, r = _pair((CHACHA,), (AES,))
    with pytest.raises(HandshakeError, match="allow chacha20poly1305"):
        r.receive_data(i.start())
    with pytest.raises(HandshakeError, match="no common cipher"):
        i.receive_data(r.farewell)


def _tamper_accept(frame: bytes, **fields) -> bytes:
    msg = msgpack.unpackb(frame[4:])
    msg.update(fields)
    body = msgpack.packb(msg, use_bin_type=True)
    return len(body).to_bytes(4, "little") + body


def test_cipher_pick_is_signed_so_it_cannot_be_downgraded() -> None:
    i, r = _pair((AES, CHACHA), (AES, CHACHA))
    accept = r.receive_data(i.start())
    with pytest.raises(HandshakeError, match="bad signature"):
        i.receive_data(_tamper_accept(accept[0], cipher=CHACHA))


def test_cipher_offer_is_signed_so_it_cannot_be_stripped() -> None:
    i, r = _pair((AES, CHACHA), (AES, CHACHA))
    hello = _tamper_accept(i.start(), ciphers=[CHACHA])  # a man in the middle narrows the offer
    accept = r.receive_data(hello)
    with pytest.raises(HandshakeError, match="bad signature"):
        i.receive_data(b"".join(accept))


def test_a_pick_that_was_not_offered_is_refused() -> None:
    i, r = _pair((CHACHA,), (AES, CHACHA))
    accept = r.receive_data(i.start())
    with pytest.raises(HandshakeError, match="did not offer"):
        i.receive_data(_tamper_accept(accept[0], cipher=AES))


def test_unknown_cipher_names_are_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="drawn from"):
        ActorSystem(NodeIdentity.generate(), SECRET, ciphers=("rot13",))


@pytest.mark.parametrize("cipher", ciphers.KNOWN)
async def test_each_cipher_carries_tensors_over_tcp(cipher: str) -> None:
    a = ActorSystem(NodeIdentity.generate(), SECRET, ciphers=(cipher,))
    b = ActorSystem(NodeIdentity.generate(), SECRET)  # offers everything; a picks from its own list
    await a.start("127.0.0.1", 0)
    await b.start("127.0.0.1", 0)
    try:
        a.spawn(Echo(), name="echo")
        peer = await b.connect(*a.address)
        assert b.cipher_of(peer) == a.cipher_of(b.node_id) == cipher
        ref = b.ref(peer, "echo")
        big = np.random.default_rng(0).standard_normal((3, 1 << 18)).astype(np.float32)  # 3 MiB: big records
        for value in (big, big[:, :5].copy(), np.zeros((0, 4), np.int8), "small"):
            back = await ref.ask(value, timeout=10)
            if isinstance(value, np.ndarray):
                assert back.dtype == value.dtype and np.array_equal(back, value)
            else:
                assert back == value
    finally:
        await b.stop()
        await a.stop()
