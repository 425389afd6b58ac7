"""The API's defences against the network and the browser on the same machine.

Jupyter's and Ollama's are the bar. One middleware, checked in this order:

1. **Host allowlist** (DNS rebinding): a page at ``evil.example`` whose name the attacker
   re-points at 127.0.0.1 becomes same-origin with the API, but its requests still say
   ``Host: evil.example``. Accepted: IP literals (a page cannot be served from one it does
   not control), ``localhost`` and ``*.localhost``, the node's configured hosts, and
   ``--api-allow-host`` names (``.example.lan`` allows a whole suffix). Else 403.
2. **CORS**: a preflight is answered only for ``--api-allow-origin`` origins; responses
   to those origins carry ``Access-Control-Allow-Origin``. Nothing else is cross-origin.
3. **The API key** covers every route, the dashboard included. A browser proves it once:
   ``/?key=KEY`` sets an HttpOnly, SameSite=Strict cookie holding an HMAC of the key
   (never the key), and the dashboard asks for the key when it has none.
4. **State-changing requests** (POST) must be ``application/json`` (a web page can send
   a text/plain POST without a preflight: CSRF) and must not come from a foreign Origin.

And the limits: body and prompt size, concurrent generations with a bounded queue
(429 beyond it), header and body timeouts. All pure checks on a request's method,
path and headers, so they are tested without a server.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable, Mapping
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost",)
COOKIE = "mesh_api"
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
_JSON_TYPES = ("application/json",)


@dataclass
class ApiPolicy:
    """What the API accepts beyond the safe defaults, and its limits."""

    allow_hosts: list[str] = field(default_factory=list)    # Host names besides IPs, localhost, the node's hosts
    allow_origins: list[str] = field(default_factory=list)  # origins allowed cross-origin (CORS), e.g. http://x:3000
    max_body_bytes: int = 1 << 20       # a request body larger than this is a 413
    max_prompt_bytes: int = 256 << 10   # the prompt text (all messages), UTF-8; tokenized off the event loop
    max_generations: int = 16           # generations running at once (a stage batches up to 16)
    max_queue: int = 64                 # generations waiting for a slot; beyond it a 429
    queue_timeout_s: float = 30.0       # a waiting generation gives up with a 429 after this long
    header_timeout_s: float = 10.0      # a connection must finish its request headers (and idle no longer)
    body_timeout_s: float = 30.0        # a request must finish sending its body


class Refused(Exception):
    """A request the guard refuses: ``status``, an OpenAI-style ``code`` and a message that says why."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, dict(headers or {})


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port, lower case; IPv6 without brackets."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostAllowlist:
    def __init__(self, configured: Iterable[str] = (), extra: Iterable[str] = ()):
        names = {host_name(h) for h in (*configured, *extra) if h}
        self.exact = {n for n in names if not n.startswith(".")} | set(LOOPBACK_NAMES)
        self.suffixes = tuple(n for n in names if n.startswith(".")) + (".localhost",)

    def allows(self, host_header: str | None) -> bool:
        if not host_header:
            return False  # HTTP/1.1 requires one; a request without it is not a browser's
        name = host_name(host_header)
        return _is_ip(name) or name in self.exact or name.endswith(self.suffixes)


def origin_of(url: str) -> str:
    parts = urlsplit(url.strip().lower())
    return f"{parts.scheme}://{parts.netloc}"


def dashboard_cookie(api_key: str) -> str:
    """What the dashboard's cookie holds: a MAC of the key, so the cookie never reveals it."""
    return hmac.new(api_key.encode(), b"mesh dashboard cookie v1", hashlib.sha256).hexdigest()


class Guard:
    """The checks of one API, as a pure function of a request's method, path and headers."""

    def __init__(self, policy: ApiPolicy, *, api_key: str | None, hosts: Iterable[str] = ()):
        self.policy = policy
        self.api_key = api_key
        self.hosts = HostAllowlist(hosts, policy.allow_hosts)
        self.origins = {origin_of(o) for o in policy.allow_origins}
        self._bearer = f"Bearer {api_key}".encode() if api_key else b""
        self._cookie = dashboard_cookie(api_key).encode() if api_key else b""

    def check_host(self, headers: Mapping[str, str]) -> None:
        if not self.hosts.allows(headers.get("Host")):
            raise Refused(403, "host_not_allowed",
                          f"Host {headers.get('Host')!r} is not allowed (DNS rebinding defence); "
                          "start the node with --api-allow-host NAME to serve it under that name")

    def cors_origin(self, headers: Mapping[str, str]) -> str | None:
        """The Origin to echo in Access-Control-Allow-Origin, if the user allowed it."""
        origin = headers.get("Origin")
        return origin if origin and origin_of(origin) in self.origins else None

    def preflight(self, headers: Mapping[str, str]) -> dict[str, str]:
        origin = self.cors_origin(headers)
        if origin is None:
            raise Refused(403, "origin_not_allowed",
                          f"cross-origin requests from {headers.get('Origin')!r} are not allowed; "
                          "start the node with --api-allow-origin ORIGIN to allow them")
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": "Authorization, Content-Type", "Access-Control-Max-Age": "600",
                "Vary": "Origin"}

    def authorized(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> bool:
        if not self.api_key:
            return True
        given = headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, self._bearer):
            return True
        return hmac.compare_digest(cookies.get(COOKIE, "").encode(), self._cookie)

    def key_matches(self, key: str) -> bool:
        return bool(self.api_key) and hmac.compare_digest(key.encode(), self.api_key.encode())

    def check_auth(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> None:
        if not self.authorized(headers, cookies):
            raise Refused(401, "invalid_api_key", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                          {"WWW-Authenticate": "Bearer"})

    def check_state_change(self, method: str, headers: Mapping[str, str]) -> None:
        if method not in STATE_CHANGING:
            return
        origin = headers.get("Origin")
        if origin is not None and not self._same_origin(origin, headers) and self.cors_origin(headers) is None:
            raise Refused(403, "origin_not_allowed",
                          f"a {method} from the web page at {origin!r} is refused (cross-site request forgery "
                          "defence); start the node with --api-allow-origin ORIGIN to allow that page")
        if headers.get("Sec-Fetch-Site") == "cross-site" and self.cors_origin(headers) is None:
            raise Refused(403, "origin_not_allowed", "a cross-site request is refused (CSRF defence)")
        kind = headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if kind not in _JSON_TYPES:
            raise Refused(415, "unsupported_media_type",
                          f"send the request body as JSON with 'Content-Type: application/json' (got {kind or 'none'!r})")

    @staticmethod
    def _same_origin(origin: str, headers: Mapping[str, str]) -> bool:
        host = headers.get("Host", "")
        parts = urlsplit(origin.strip().lower())
        return bool(host) and parts.scheme in ("http", "https") and parts.netloc == host.strip().lower()

    def check_prompt(self, size: int) -> None:
        if size > self.policy.max_prompt_bytes:
            raise Refused(413, "prompt_too_large",
                          f"the prompt is {size} bytes; this node accepts at most {self.policy.max_prompt_bytes}")


class TooBusy(Exception):
    pass


class ClientGone(Exception):
    """The client closed its connection while its generation waited for a slot."""


GONE_POLL_S = 0.1  # how often a queued generation checks that its client is still there


class Admission:
    """At most ``limit`` generations at once and ``queue`` more waiting; the rest are refused.

    Waiting is bounded in count and in time, so a flood of requests costs a 429 each,
    never memory or a stalled event loop."""

    def __init__(self, limit: int, queue: int, queue_timeout_s: float):
        self.limit, self.queue, self.queue_timeout_s = limit, queue, queue_timeout_s
        self.active = 0
        self.waiting = 0
        self.refused = 0
        self.abandoned = 0  # queued generations whose client left before their turn
        self._free = asyncio.Condition()

    @asynccontextmanager
    async def slot(self, gone: Callable[[], bool] = lambda: False) -> AsyncIterator[None]:
        """A generation slot. ``gone`` says the client has left: a waiter that sees it
        gives its place up at once (ClientGone), rather than at the queue timeout."""
        await self._acquire(gone)
        try:
            yield
        finally:
            async with self._free:
                self.active -= 1
                self._free.notify_all()  # not notify(1): a waiter that just timed out would swallow it

    async def _acquire(self, gone: Callable[[], bool]) -> None:
        if self.active < self.limit and self.waiting == 0:
            self.active += 1
            return
        if self.waiting >= self.queue:
            self.refused += 1
            raise TooBusy(f"{self.active} generations running and {self.waiting} waiting; retry shortly")
        self.waiting += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_timeout_s
        try:
            async with self._free:
                while self.active >= self.limit:
                    left = deadline - loop.time()
                    if left <= 0:
                        self.refused += 1
                        raise TooBusy(f"no generation slot within {self.queue_timeout_s:g}s; retry shortly")
                    try:  # wake for a free slot, or every GONE_POLL_S to see whether the client left
                        await asyncio.wait_for(self._free.wait(), min(left, GONE_POLL_S))
                    except asyncio.TimeoutError:
                        pass
                    if gone():
                        self.abandoned += 1
                        raise ClientGone("the client left while its generation was queued")
                self.active += 1
        finally:
            self.waiting -= 1
