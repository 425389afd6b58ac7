"""Identity, handshake and encrypted channel: sans-IO, then over real TCP on loopback."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest
from structlog.testing import capture_logs

from actors import Actor, ActorSystem, NodeIdentity, ciphers
from actors.errors import ClusterSecretMismatch, DecryptError, HandshakeError, ReplayError
from actors.handshake import Handshake
from actors.secure import SecureChannel

from actor_kit import SECRET
from waiting import until


def _pair(secret_a: bytes = SECRET, secret_b: bytes = SECRET, offer: tuple[str, ...] | None = None) -> tuple[Handshake, Handshake]:
    i = Handshake(NodeIdentity.generate(), secret_a, True, ("127.0.0.1", 1), offer)
    r = Handshake(NodeIdentity.generate(), secret_b, False, None, offer)
    return i, r


def _run(i: Handshake, r: Handshake) -> None:
    out = [i.start()]
    side = r
    while out:
        data = b"".join(out)
        out = side.receive_data(data)
        side = i if side is r else r


def _channels(cipher: str) -> tuple[SecureChannel, SecureChannel]:
    i, r = _pair(offer=(cipher,))
    _run(i, r)
    a, b = i.result, r.result
    assert a and b and a.cipher == b.cipher == cipher
    return (
        SecureChannel(a.send_key, a.recv_key, a.send_direction, a.recv_direction, cipher=a.cipher),
        SecureChannel(b.send_key, b.recv_key, b.send_direction, b.recv_direction, cipher=b.cipher),
    )


def _wire(parts: list) -> bytes:
    return b"".join(bytes(p) for p in parts)


def test_identity_file_is_private_and_stable(tmp_path) -> None:
    a = NodeIdentity.load_or_create(tmp_path / "state")
    path = tmp_path / "state" / "node.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert NodeIdentity.load_or_create(tmp_path / "state").node_id == a.node_id
    assert len(a.node_id) == 16 and int(a.node_id, 16) >= 0


def test_handshake_binds_keys_and_derives_directional_keys() -> None:
    i, r = _pair()
    _run(i, r)
    assert i.result and r.result
    assert i.result.peer_node_id == r.identity.node_id and r.result.peer_node_id == i.identity.node_id
    assert i.result.send_key == r.result.recv_key and i.result.recv_key == r.result.send_key
    assert i.result.send_key != i.result.recv_key
    assert r.result.peer_listen == ("127.0.0.1", 1)


def test_wrong_secret_refused_and_responder_reveals_nothing_first(monkeypatch) -> None:
    """A wrong secret is refused at the hello (its MAC), before the responder does any DH or
    signature; what the responder sends back is a bare refusal, and the initiator learns
    from it that the secrets differ."""
    import actors.handshake as hs

    work: list[str] = []
    real_dh, real_sign = hs.crypto_scalarmult, NodeIdentity.sign
    monkeypatch.setattr(hs, "crypto_scalarmult", lambda *a: work.append("dh") or real_dh(*a))
    monkeypatch.setattr(NodeIdentity, "sign", lambda self, d: work.append("sign") or real_sign(self, d))
    i, r = _pair(SECRET, b"another secret entirely")
    hello = i.start()
    with pytest.raises(ClusterSecretMismatch, match="check --secret-file"):
        r.receive_data(hello)
    assert work == [] and r._eph is None  # no DH, no signature, not even an ephemeral key
    assert __import__("msgpack").unpackb(r.farewell[4:]) == {"t": "refuse", "reason": "secret"}
    with pytest.raises(ClusterSecretMismatch, match="check --secret-file"):
        i.receive_data(r.farewell)
    # With the right secret, the responder's first answer holds only public values:
    # keys, nonce, cipher name, signature.
    i, r = _pair()
    accept = r.receive_data(i.start())
    assert set(__import__("msgpack").unpackb(accept[0][4:])) == {"t", "eph", "nonce", "pub", "cipher", "sig"}


def test_a_proof_under_another_secret_is_still_refused() -> None:
    """Past the hello (a peer that knows the MAC key but not the psk, in this test by
    swapping keys), the proof check still refuses."""
    i, r = _pair()
    r._secret = b"another secret entirely"  # psk differs, MAC key the same
    accept = r.receive_data(i.start())
    prove = i.receive_data(b"".join(accept))
    with pytest.raises(ClusterSecretMismatch):
        r.receive_data(b"".join(prove))
    with pytest.raises(ClusterSecretMismatch):
        i.receive_data(r.farewell)


def test_tampered_handshake_signature_is_rejected() -> None:
    i, r = _pair()
    accept = bytearray(b"".join(r.receive_data(i.start())))
    accept[-1] ^= 1  # last byte of sig_r
    with pytest.raises(HandshakeError):
        i.receive_data(bytes(accept))


@pytest.mark.parametrize("cipher", ciphers.KNOWN)
def test_channel_rejects_flipped_bit_replay_and_reorder(cipher: str) -> None:
    a, b = _channels(cipher)
    first = _wire(a.send("one"))
    second = _wire(a.send("two"))
    b.receive_data(first)
    assert b.next_message() == "one"
    with pytest.raises(ReplayError):
        b.receive_data(first)  # replay
    a2, b2 = _channels(cipher)
    one, two = _wire(a2.send("one")), _wire(a2.send("two"))
    with pytest.raises(ReplayError):
        b2.receive_data(two + one)  # reordered: counter 2 before 1
    a3, b3 = _channels(cipher)
    data = bytearray(_wire(a3.send({"x": b"payload" * 10})))
    data[20] ^= 0x10
    with pytest.raises(DecryptError):
        b3.receive_data(bytes(data))
    assert second  # sent but never delivered: nothing else to check


# ---- over real TCP on loopback ------------------------------------------------------


class Echo(Actor):
    async def receive(self, msg, ctx):
        return msg


async def _tcp_pair(secret_b: bytes = SECRET, offer: tuple[str, ...] | None = None) -> tuple[ActorSystem, ActorSystem]:
    a = ActorSystem(NodeIdentity.generate(), SECRET, ciphers=offer)
    b = ActorSystem(NodeIdentity.generate(), secret_b, ciphers=offer)
    await a.start("127.0.0.1", 0)
    await b.start("127.0.0.1", 0)
    a.spawn(Echo(), name="echo")
    return a, b


async def test_tcp_wrong_secret_is_refused_on_both_sides() -> None:
    a, b = await _tcp_pair(secret_b=b"a different cluster secret......")
    try:
        with capture_logs() as logs:
            with pytest.raises(ClusterSecretMismatch) as info:
                await b.connect(*a.address)
            await until(lambda: len([e for e in logs if e["event"] == "link.secret_mismatch"]) >= 2,
                        what="both sides logging the refusal")
        assert "check --secret-file" in str(info.value)
        refusals = [e for e in logs if e["event"] == "link.secret_mismatch"]
        assert {e["node"] for e in refusals} == {a.node_id, b.node_id}
        assert all("check --secret-file" in e["detail"] for e in refusals)
        assert a.peers() == {} and b.peers() == {}
    finally:
        await a.stop()
        await b.stop()


async def _inject(link, records: list) -> None:
    """Write raw records on the link; wait until the far side has dropped it."""
    link.stream.write(records)
    await until(lambda: link.closed, what="the far side dropping the link")


@pytest.mark.parametrize("cipher", ciphers.KNOWN)
@pytest.mark.parametrize("attack", ["flip", "replay"])
async def test_tcp_tampered_or_replayed_frame_is_rejected(attack: str, cipher: str) -> None:
    a, b = await _tcp_pair(offer=(cipher,))
    try:
        peer = await b.connect(*a.address)
        assert b.cipher_of(peer) == a.cipher_of(b.node_id) == cipher
        ref = b.ref(peer, "echo")
        link = b._links[peer]
        sent: list = []
        real_write = link.stream.write
        link.stream.write = lambda parts: (sent.append(_wire(parts)), real_write(parts))[1]
        assert await ref.ask("hello", timeout=2) == "hello"
        request = sent[0]
        with capture_logs() as logs:
            if attack == "flip":
                records = bytearray(_wire(link._channel.send("x" * 100)))
                records[40] ^= 0x01
                await _inject(link, [bytes(records)])
                expected = "DecryptError"
            else:
                await _inject(link, [request])
                expected = "ReplayError"
        rejected = [e for e in logs if e["event"] == "link.frame_rejected"]
        assert rejected and rejected[0]["error"] == expected
        assert link.closed  # a dropped that connection (b then redials: a fresh session)
        await until(lambda: peer in b.peers() and b._links[peer] is not link, what="b's redial")
        assert await ref.ask("again", timeout=3) == "again"
    finally:
        await a.stop()
        await b.stop()


async def test_tcp_garbage_peer_is_dropped_while_others_keep_working() -> None:
    a, b = await _tcp_pair()
    try:
        peer = await b.connect(*a.address)
        ref = b.ref(peer, "echo")
        reader, writer = await asyncio.open_connection(*a.address)
        writer.write(os.urandom(64 * 1024))
        answers = [await ref.ask(i, timeout=2) for i in range(20)]
        assert answers == list(range(20))
        try:  # a closed the garbage connection (unread bytes make it a reset)
            assert await asyncio.wait_for(reader.read(), 5) == b""
        except ConnectionResetError:
            pass
        writer.close()
        # a post-handshake garbage sender is dropped too, and b still works through a
        c = ActorSystem(NodeIdentity.generate(), SECRET)
        await c.start("127.0.0.1", 0)
        await c.connect(*a.address)
        link = c._links[a.node_id]
        link.stream.write([os.urandom(4096)])
        await until(lambda: link.closed, what="a dropping the garbage sender")
        assert await ref.ask("still here", timeout=2) == "still here"
        await c.stop()
    finally:
        await a.stop()
        await b.stop()
