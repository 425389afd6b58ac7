"""Finding peers: mDNS (`_mesh._tcp.local.`, python-zeroconf's async API) and static addresses.

Discovery only produces hints (`PeerHint`: node id, host, port). Membership is decided
over the authenticated transport: a hint leads to `system.connect(host, port)`, and a
peer without the cluster secret fails the handshake. mDNS records live for minutes, so
discovery is never a failure detector.

TXT records hold `id` (node id), `port` and `cluster` (a keyed BLAKE3 tag derived from
the cluster secret; it lets nodes of different clusters ignore each other and reveals
nothing usable about the secret). Malformed records are ignored with a debug log line.

mDNS only ever sends on the interfaces it is given: there is no default, the caller
passes the addresses of the LAN interfaces it means (tests use private namespaces).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import blake3
import structlog
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from mesh.cluster.errors import ClusterError

log = structlog.get_logger("mesh.cluster.discovery")

SERVICE_TYPE = "_mesh._tcp.local."
TAG_CONTEXT = "mesh 2026-01 cluster tag v1"
_MAX_ID = 64
MAX_RESOLVING = 32  # mDNS records resolved at once; more announcements wait for a re-announce


@dataclass(frozen=True, slots=True)
class PeerHint:
    node_id: str
    host: str
    port: int
    source: str = "mdns"


def cluster_tag(secret: bytes) -> str:
    """A short public identifier of the cluster, derived one-way from its secret."""
    return blake3.blake3(secret, derive_key_context=TAG_CONTEXT).hexdigest()[:16]


def parse_peer(text: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` from `--peer`; raises a `ClusterError` that says what is wrong."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"--peer {text!r} is not host:port (for example 192.168.1.20:7946)")
    return host, int(port)


def _text(value: object) -> str | None:
    if not isinstance(value, bytes) or len(value) > 256:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def parse_txt(
    properties: Mapping[bytes, bytes | None], addresses: list[str], expected_tag: str
) -> PeerHint | None:
    """The hint in one mDNS record, or None if it is malformed or from another cluster."""
    node_id = _text(properties.get(b"id"))
    port = _text(properties.get(b"port"))
    tag = _text(properties.get(b"cluster"))
    if node_id is None or not 0 < len(node_id) <= _MAX_ID or not node_id.isalnum():
        return None
    if port is None or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if tag != expected_tag:
        return None
    for addr in addresses:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            continue
        if not (ip.is_multicast or ip.is_unspecified):
            return PeerHint(node_id, str(ip), int(port))
    return None


OnPeer = Callable[[PeerHint], Awaitable[None] | None]


class MdnsDiscovery:
    """Announce this node and report the other nodes of the same cluster."""

    def __init__(
        self,
        node_id: str,
        port: int,
        secret: bytes,
        interfaces: list[str],
        on_peer: OnPeer,
        advertise: str | None = None,
    ) -> None:
        if not interfaces:
            raise ClusterError("mDNS needs the address of at least one interface to announce on")
        self.node_id = node_id
        self.port = port
        self.tag = cluster_tag(secret)
        self.interfaces = interfaces
        self.advertise = advertise or interfaces[0]
        self.on_peer = on_peer
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._resolving: set[str] = set()
        self.max_resolving = MAX_RESOLVING
        self.resolves_dropped = 0

    async def start(self) -> None:
        self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        name = f"mesh-{self.node_id}.{SERVICE_TYPE}"
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            name,
            addresses=[socket.inet_aton(self.advertise)],
            port=self.port,
            properties={"id": self.node_id, "port": str(self.port), "cluster": self.tag},
            server=f"mesh-{self.node_id}.local.",
        )
        # Browse first: registration probes for ~0.75 s, and the peers found meanwhile count
        # for the bootstrap decision (who founds the cluster) that follows start().
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_change])
        await self._zc.async_register_service(self._info)
        log.info("mdns.started", node=self.node_id, interfaces=self.interfaces, port=self.port)

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            return  # a removed record says nothing about liveness; heartbeats decide
        # Each resolve is a task and up to 3 s of queries: a flood of announced names must
        # not become a flood of them. A real peer re-announces, and dials us too.
        if name in self._resolving or len(self._resolving) >= self.max_resolving:
            self.resolves_dropped += 1
            log.debug("mdns.resolve_dropped", name=name[:100], resolving=len(self._resolving))
            return
        self._resolving.add(name)
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._resolving.discard(name))

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(service_type, name)
        try:
            if not await info.async_request(self._zc.zeroconf, 3000):
                return
            hint = parse_txt(info.properties or {}, info.parsed_addresses(), self.tag)
        except Exception as exc:  # a hostile record must not take discovery down
            log.debug("mdns.bad_record", name=name, error=repr(exc))
            return
        if hint is None:
            log.debug("mdns.ignored_record", name=name)
            return
        if hint.node_id == self.node_id:
            return
        result = self.on_peer(hint)
        if asyncio.iscoroutine(result):
            await result

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            if self._info is not None:
                await self._zc.async_unregister_service(self._info)
            await self._zc.async_close()
        self._zc = self._browser = self._info = None
