"""Finding a node's HTTP API on the LAN: `_mesh-api._tcp.local.` mDNS records.

Each node announces its API (address, port, node id, name, model, whether a key is
required) on the interfaces where that API is reachable, so `mesh run` and
`mesh status` work without --api. Anyone on the LAN can announce such a record, so
each one is **signed**: the TXT carries the node's Ed25519 public key and a signature
over the address, port and fields. A record is `verified` when the key hashes to the
node id it claims and the signature covers the very address and port it points to
(a forger can only replay a member's record, which points at that member). Whether a
verified node is one of *ours* is the client's decision (`mesh.commands.run.find_api`:
trusted ids, then the members those report); an unverified announcer is never sent a
prompt or a key. Peer discovery (`mesh.cluster.discovery`) is separate and keyed by
the cluster secret.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from dataclasses import dataclass

import structlog

from actors.identity import NodeIdentity, node_id_of
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = structlog.get_logger("mesh.http.discovery")

API_SERVICE = "_mesh-api._tcp.local."
_WILDCARD = ("0.0.0.0", "::", "")


RECORD_CONTEXT = "mesh api record v1"


@dataclass(frozen=True)
class ApiHint:
    url: str
    node_id: str
    name: str
    model: str
    needs_key: bool
    verified: bool = False  # signed by the key of node_id, for this address and port


def record_bytes(address: str, port: int, fields: dict[str, str]) -> bytes:
    """What a record's signature covers: the context, where it points, and every field."""
    keys = ("id", "name", "model", "key", "pk")
    return json.dumps([RECORD_CONTEXT, address, port, *(fields.get(k, "") for k in keys)],
                      separators=(",", ":")).encode()


def signed_properties(identity: NodeIdentity, address: str, port: int, *, name: str, model: str,
                      needs_key: bool) -> dict[str, str]:
    fields = {"id": identity.node_id, "name": name[:63], "model": model[:63], "key": "1" if needs_key else "0",
              "pk": identity.public_key.hex()}
    fields["sig"] = identity.sign(record_bytes(address, port, fields)).hex()
    return fields


def verify_record(address: str, port: int, fields: dict[str, str]) -> bool:
    """True when ``fields`` were signed by the key of the node id they claim, for exactly this address and port."""
    try:
        public_key, signature = bytes.fromhex(fields.get("pk", "")), bytes.fromhex(fields.get("sig", ""))
    except ValueError:
        return False
    if len(public_key) != 32 or len(signature) != 64 or node_id_of(public_key) != fields.get("id"):
        return False
    return NodeIdentity.verify(public_key, record_bytes(address, port, fields), signature)


def reachable_on(api_host: str, interfaces: list[str]) -> list[str]:
    """The interfaces whose address reaches an API bound to ``api_host``."""
    if api_host in _WILDCARD:
        return list(interfaces)
    return [i for i in interfaces if i == api_host]


class ApiAnnouncer:
    def __init__(self, interfaces: list[str], port: int, *, identity: NodeIdentity, name: str, model: str,
                 needs_key: bool):
        self.interfaces = interfaces
        node_id = identity.node_id
        self.info = AsyncServiceInfo(
            API_SERVICE, f"mesh-api-{node_id}.{API_SERVICE}",
            addresses=[socket.inet_aton(interfaces[0])], port=port,
            properties=signed_properties(identity, interfaces[0], port, name=name, model=model, needs_key=needs_key),
            server=f"mesh-api-{node_id}.local.")
        self._zc: AsyncZeroconf | None = None

    async def start(self) -> None:
        self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        await self._zc.async_register_service(self.info)

    async def stop(self) -> None:
        if self._zc is not None:
            await self._zc.async_unregister_service(self.info)
            await self._zc.async_close()
            self._zc = None


def _prop(props: dict, key: bytes, limit: int = 64) -> str:
    value = props.get(key)
    return value.decode("utf-8", "replace")[:limit] if isinstance(value, bytes) else ""


async def find_apis(interfaces: list[str], timeout: float = 3.0, *, settle: float | None = 0.5) -> list[ApiHint]:
    """Browse for mesh APIs on ``interfaces`` for up to ``timeout`` seconds; with ``settle``,
    return that many seconds after the first one is found (the others answer at about the same time)."""
    found: dict[str, ApiHint] = {}
    got_one = asyncio.Event()
    zc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    tasks: set[asyncio.Task] = set()

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(API_SERVICE, name)
        try:
            if not await info.async_request(zc.zeroconf, 2000):
                return
            props = info.properties or {}
            for addr in info.parsed_addresses():
                ip = ipaddress.ip_address(addr)
                if ip.version == 4 and not (ip.is_multicast or ip.is_unspecified) and info.port:
                    fields = {k: _prop(props, k.encode(), 160) for k in ("id", "name", "model", "key", "pk", "sig")}
                    found[name] = ApiHint(f"http://{addr}:{info.port}", fields["id"][:64], fields["name"][:64],
                                          fields["model"][:64], fields["key"] == "1",
                                          verified=verify_record(addr, info.port, fields))
                    got_one.set()
                    return
        except Exception as exc:  # a malformed record must not stop the search
            log.debug("api.record_ignored", name=name, error=repr(exc))

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            task = asyncio.get_running_loop().create_task(resolve(name))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    browser = AsyncServiceBrowser(zc.zeroconf, [API_SERVICE], handlers=[on_change])
    try:
        if settle is not None:
            try:
                await asyncio.wait_for(got_one.wait(), timeout)
                await asyncio.sleep(settle)
            except asyncio.TimeoutError:
                pass
        else:
            await asyncio.sleep(timeout)
    finally:
        await browser.async_cancel()
        for task in list(tasks):
            task.cancel()
        await zc.async_close()
    return sorted(found.values(), key=lambda h: h.name)
