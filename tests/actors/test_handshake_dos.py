"""What a stranger (or a replayer) can make a responder do before authentication (issue 17).

Before: every hello, even a replayed one, cost the responder an X25519 DH and an Ed25519
signature, and pending handshakes had no cap. Now the responder checks the hello's MAC
(keyed from the cluster secret), its timestamp and a replay guard before any public-key
work, and a node caps its pending inbound handshakes (in all, and per remote host).
"""

from __future__ import annotations

import asyncio
import socket

import msgpack
import pytest
from structlog.testing import capture_logs

import actors.handshake as hs
from actors import ActorSystem, HelloRefused, NodeIdentity
from actors.admission import HandshakeGate
from actors.errors import ClusterSecretMismatch, HandshakeError
from actors.handshake import FRESHNESS_S, VERSION, Handshake, ReplayGuard

from actor_kit import SECRET
from waiting import until


@pytest.fixture
def public_key_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every X25519 DH, Ed25519 signature and X25519 key generation the handshakes do."""
    work: list[str] = []
    real_dh, real_sign, real_generate = hs.crypto_scalarmult, NodeIdentity.sign, hs.PrivateKey.generate
    monkeypatch.setattr(hs, "crypto_scalarmult", lambda *a: work.append("dh") or real_dh(*a))
    monkeypatch.setattr(NodeIdentity, "sign", lambda self, d: work.append("sign") or real_sign(self, d))
    monkeypatch.setattr(hs.PrivateKey, "generate", classmethod(lambda cls: work.append("keygen") or real_generate()))
    return work


def responder(guard: ReplayGuard | None = None, wall=None, secret: bytes = SECRET) -> Handshake:
    kw = {"wall": wall} if wall is not None else {}
    return Handshake(NodeIdentity.generate(), secret, False, None, replay=guard, **kw)


def hello(secret: bytes = SECRET, wall=None) -> bytes:
    kw = {"wall": wall} if wall is not None else {}
    return Handshake(NodeIdentity.generate(), secret, True, ("127.0.0.1", 1), **kw).start()


def test_a_strangers_hello_costs_no_public_key_work(public_key_work: list[str]) -> None:
    frame = hello(b"not the cluster secret")
    public_key_work.clear()  # the initiator's own keygen
    r = responder()
    with pytest.raises(ClusterSecretMismatch):
        r.receive_data(frame)
    assert public_key_work == []


def test_a_replayed_hello_is_refused_before_any_public_key_work(public_key_work: list[str]) -> None:
    guard = ReplayGuard()
    frame = hello()
    first = responder(guard)
    assert first.receive_data(frame)  # the genuine hello: an accept
    public_key_work.clear()
    for _ in range(3):
        with pytest.raises(HelloRefused) as info:
            responder(guard).receive_data(frame)
        assert info.value.reason == "replay"
    assert public_key_work == []
    assert len(guard) == 1


def test_a_stale_or_future_hello_is_refused_before_any_public_key_work(public_key_work: list[str]) -> None:
    now = 1_800_000_000.0
    for skew in (-FRESHNESS_S - 5, FRESHNESS_S + 5):
        frame = hello(wall=lambda skew=skew: now + skew)
        public_key_work.clear()
        r = responder(wall=lambda: now)
        with pytest.raises(HelloRefused) as info:
            r.receive_data(frame)
        assert info.value.reason == "stale" and "NTP" in str(info.value)
        assert public_key_work == []
        assert b"stale" in r.farewell
    # Within the window both ways, the hello is accepted.
    for skew in (-FRESHNESS_S + 5, FRESHNESS_S - 5):
        assert responder(wall=lambda: now).receive_data(hello(wall=lambda skew=skew: now + skew))


def test_a_tampered_hello_body_fails_its_mac(public_key_work: list[str]) -> None:
    frame = bytearray(hello())
    frame[40] ^= 1  # inside the body
    public_key_work.clear()
    with pytest.raises(HandshakeError):
        responder().receive_data(bytes(frame))
    assert public_key_work == []


def test_an_old_version_hello_is_refused_by_version() -> None:
    body = msgpack.packb({"t": "hello", "v": VERSION - 1, "eph": bytes(32), "nonce": bytes(32), "pub": bytes(32),
                          "listen": None, "ciphers": ["chacha20poly1305"]})
    r = responder()
    with pytest.raises(HandshakeError, match="version"):
        r.receive_data(len(body).to_bytes(4, "little") + body)
    assert b"version" in r.farewell


def test_replay_guard_forgets_after_its_window_and_stays_bounded() -> None:
    guard = ReplayGuard(window=10.0, max_entries=3)
    assert guard.first_use(b"a", 0.0) and not guard.first_use(b"a", 5.0)
    assert guard.first_use(b"a", 21.0)  # 2 x window later: the hello itself is stale by now
    for mac in (b"b", b"c", b"d", b"e"):
        assert guard.first_use(mac, 22.0)
    assert len(guard) <= 3


def test_handshake_gate_caps_pending_in_all_and_per_host() -> None:
    gate = HandshakeGate(max_pending=4, max_pending_per_host=2)
    assert gate.try_enter("10.0.0.9") and gate.try_enter("10.0.0.9")
    assert not gate.try_enter("10.0.0.9")  # per host
    assert gate.try_enter("10.0.0.2") and gate.try_enter("10.0.0.3")
    assert not gate.try_enter("10.0.0.4")  # in all
    gate.leave("10.0.0.9")
    assert gate.try_enter("10.0.0.4") and gate.pending == 4 and gate.refused_busy == 2


# ---- over real TCP on loopback ------------------------------------------------------------


async def test_tcp_pending_handshakes_are_capped_and_the_excess_closed_at_once() -> None:
    """Silent connections past the cap are closed by the server right away (they used to be
    handed to the node before their transport existed, where an abort did nothing)."""
    server = ActorSystem(NodeIdentity.generate(), SECRET, max_pending_handshakes=4, handshake_timeout=30.0)
    await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    try:
        for _ in range(12):
            sock = socket.create_connection(server.address)
            sock.setblocking(False)
            socks.append(sock)
        # The per-host cap is a quarter of 4 (all of these come from 127.0.0.1): 1 pending.
        await until(lambda: server._gate.refused_busy >= 11, 5, "the excess connections refused")
        assert server._gate.pending == 1

        async def closed(sock: socket.socket) -> bool:
            try:
                return await asyncio.wait_for(loop.sock_recv(sock, 1), 2) == b""
            except ConnectionResetError:
                return True
            except asyncio.TimeoutError:
                return False

        states = [await closed(s) for s in socks]
        assert states.count(True) == 11 and states.count(False) == 1
        # Once the silent one goes, an honest peer on the same host connects.
        socks[states.index(False)].close()
        await until(lambda: server._gate.pending == 0, 5, "the silent handshake to end")
        client = ActorSystem(NodeIdentity.generate(), SECRET)
        await client.start("127.0.0.1", 0)
        try:
            assert await client.connect(*server.address) == server.node_id
        finally:
            await client.stop()
    finally:
        for sock in socks:
            sock.close()
        await server.stop()


async def test_tcp_a_flood_of_strangers_hellos_logs_a_few_lines_not_one_each() -> None:
    server = ActorSystem(NodeIdentity.generate(), SECRET)
    await server.start("127.0.0.1", 0)
    stranger = hello(b"not the cluster secret")
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with capture_logs() as logs:
            for _ in range(40):
                reader, writer = await asyncio.open_connection(*server.address)
                writer.write(stranger)
                assert b"secret" in await asyncio.wait_for(reader.read(), 5)  # the refusal, then EOF
                writer.close()
            await until(lambda: server._gate.pending == 0, 5, "every stranger handshake to end")
        lines = [e for e in logs if e["event"] == "link.secret_mismatch"]
        most = 1 + int((loop.time() - started) / server._gate.log_interval)  # one line per interval
        assert 1 <= len(lines) <= most < 40, (len(lines), most)
        assert sum(e["suppressed"] for e in lines[1:]) + len(lines) <= 40
        assert "check --secret-file" in lines[0]["detail"]
    finally:
        await server.stop()
