"""Issue 17 part 5: `_mesh-api._tcp` records were not authenticated, and `mesh run` /
`mesh status` sent the prompt and the API key to whoever answered mDNS first. Here forged
announcers on loopback mDNS (127.0.0.1 only) point at a trap server that records every
request; the client picks the genuine node and the trap hears nothing."""

from __future__ import annotations

import argparse
import socket

import pytest
from aiohttp import web
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from actors.identity import NodeIdentity
from mesh.commands.run import NoApiFound, find_api
from mesh.http.discovery import API_SERVICE, signed_properties, verify_record
from tests.http_api.conftest import FakeBackend

KEY = "0123456789abcdef0123456789abcdef"


def test_a_record_verifies_only_for_its_key_address_and_port():
    member, stranger = NodeIdentity.generate(), NodeIdentity.generate()
    props = signed_properties(member, "192.168.1.20", 8080, name="desktop", model="m", needs_key=True)
    assert verify_record("192.168.1.20", 8080, props)
    assert not verify_record("192.168.1.66", 8080, props)          # replayed, pointing elsewhere
    assert not verify_record("192.168.1.20", 8081, props)
    assert not verify_record("192.168.1.20", 8080, {**props, "key": "0"})  # a field changed
    forged = signed_properties(stranger, "192.168.1.20", 8080, name="desktop", model="m", needs_key=True)
    assert not verify_record("192.168.1.20", 8080, {**forged, "id": member.node_id})  # key does not hash to the id
    assert not verify_record("192.168.1.20", 8080, {**forged, "pk": member.public_key.hex()})
    assert not verify_record("192.168.1.20", 8080, {**props, "sig": "zz"})
    assert not verify_record("192.168.1.20", 8080, {k: v for k, v in props.items() if k != "sig"})


class Trap:
    """An HTTP server that answers like a mesh API and records everything it is sent."""

    def __init__(self):
        self.requests: list[tuple[str, str, bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, request.headers.get("Authorization", ""), await request.read()))
        return web.json_response({"nodes": [], "choices": []})

    async def start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]


def args(**kw) -> argparse.Namespace:
    base = dict(api=None, interfaces=["127.0.0.1"], trust=[], state_dir=None, node=None, api_key=KEY,
                api_key_file=None, discover_timeout=4.0)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
async def forgers(tmp_path):
    """Register records by hand (as an attacker would): ``await forgers(service, port, properties)``."""
    zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    infos = []

    async def announce(label: str, port: int, properties: dict) -> None:
        info = AsyncServiceInfo(API_SERVICE, f"{label}.{API_SERVICE}", addresses=[socket.inet_aton("127.0.0.1")],
                                port=port, properties=properties, server=f"{label}.local.")
        await zc.async_register_service(info)
        infos.append(info)

    yield announce
    for info in infos:
        await zc.async_unregister_service(info)
    await zc.async_close()


@pytest.mark.timeout(60)
async def test_a_forged_api_announcer_gets_no_prompt_and_no_key(serve, forgers, tmp_path):
    genuine, other, stranger = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
    served = await serve(api_key=KEY, backend=FakeBackend(members=[genuine.node_id, other.node_id]))
    await served.api.announce(["127.0.0.1"], identity=genuine, name="desktop")
    second = await serve(backend=FakeBackend(members=[other.node_id, genuine.node_id]))
    await second.api.announce(["127.0.0.1"], identity=other, name="laptop")
    trap = Trap()
    trap_port = await trap.start()
    try:
        real = signed_properties(genuine, "127.0.0.1", served.port, name="desktop", model="fake-model",
                                 needs_key=True)
        # 1. claims the genuine node's id and key, but cannot sign
        await forgers("impostor-a", trap_port, {**real, "sig": "00" * 64})
        # 2. the genuine record, replayed to point at the trap
        await forgers("impostor-b", trap_port, real)
        # 3. a stranger's own key, validly signed, with a tempting name
        await forgers("impostor-c", trap_port, signed_properties(stranger, "127.0.0.1", trap_port,
                                                                 name="desktop", model="fake-model", needs_key=False))
        state = tmp_path / "no-node-here"

        url = await find_api(args(trust=[genuine.node_id[:10]], state_dir=state))
        assert url == served.url
        # the genuine node vouches for its fellow member: found through its /v1/cluster
        url = await find_api(args(trust=[genuine.node_id], node=other.node_id[:12], state_dir=state))
        assert url == second.url
        with pytest.raises(NoApiFound, match="no trusted node"):
            await find_api(args(trust=[genuine.node_id], node=stranger.node_id[:12], state_dir=state))
        with pytest.raises(NoApiFound, match="Nothing was sent") as err:
            await find_api(args(state_dir=state))          # nothing pinned, no node on this machine
        assert "not validly signed" in str(err.value) and "signed, not a known member" in str(err.value)
        assert trap.requests == []
    finally:
        await trap.runner.cleanup()


@pytest.mark.timeout(60)
async def test_the_node_of_this_machines_state_dir_is_trusted(serve, tmp_path):
    own = NodeIdentity.load_or_create(tmp_path / "node")
    served = await serve(backend=FakeBackend(members=[own.node_id]))
    await served.api.announce(["127.0.0.1"], identity=own, name="this-machine")
    assert await find_api(args(state_dir=tmp_path / "node", node=own.node_id)) == served.url
