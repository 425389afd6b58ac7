"""The HTTP surface every node serves: an OpenAI-compatible API, the cluster view,
Prometheus metrics and the dashboard. aiohttp, in the node's own event loop."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol

import structlog
from actors.errors import ActorsError
from aiohttp import web

from mesh.http.guard import COOKIE, Admission, ApiPolicy, ClientGone, Guard, Refused, TooBusy, dashboard_cookie
from mesh.http.requests import FieldError, HttpStats, StopMatcher, parse_messages, parse_params
from mesh.errors import BadRequest, MeshError, Unavailable
from mesh.generation import GenerationParams, TokenEvent

WEB_DIR = Path(__file__).parents[1] / "web"  # mesh/web: the dashboard
log = structlog.get_logger("mesh.http.app")


class ServingBackend(Protocol):
    model_name: str

    def status(self) -> dict: ...
    def encode_chat(self, messages: list[dict]) -> list[int]: ...
    def encode_text(self, text: str) -> list[int]: ...
    def generate_stream(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[TokenEvent]: ...
    def metrics_text(self) -> str: ...
    def mesh_info(self) -> dict: ...
    async def admit(self, prefix: str) -> str: ...


def _client_gone(request: web.Request) -> Callable[[], bool]:
    """Whether the client of ``request`` has closed its connection."""
    return lambda: request.transport is None or request.transport.is_closing()


def _error(status: int, message: str, kind: str, *, param: str | None = None, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


def _bad(message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return _error(400, message, "invalid_request_error", param=param, code=code)


class Api:
    """``policy``: the limits and what is allowed beyond the safe defaults (see
    `mesh.http.guard`); ``hosts``: the node's own addresses and names, allowed as Host."""

    def __init__(self, backend: ServingBackend, *, api_key: str | None = None, policy: ApiPolicy | None = None,
                 hosts: list[str] | tuple[str, ...] = ()):
        self.backend = backend
        self.api_key = api_key
        self.policy = policy or ApiPolicy()
        self.guard = Guard(self.policy, api_key=api_key, hosts=hosts)
        self.admission = Admission(self.policy.max_generations, self.policy.max_queue, self.policy.queue_timeout_s)
        # Tokenizing a long prompt takes seconds: never on the event loop, and two at a time at most.
        self._tokenize = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mesh-tokenize")
        self.stats = HttpStats()
        self._announcer = None
        self.app = web.Application(middlewares=[self._count, self._guard, self._errors],
                                   client_max_size=self.policy.max_body_bytes)
        self.app.on_response_prepare.append(self._cors_headers)
        self.app.add_routes([
            web.get("/", self.dashboard),
            web.get("/v1/models", self.models),
            web.get("/v1/cluster", self.cluster),
            web.post("/v1/cluster/admit", self.admit),
            web.get("/metrics", self.metrics),
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
        ])
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        # keepalive_timeout also bounds a connection that never finishes its request headers:
        # aiohttp closes a connection still waiting for a whole request at that time.
        self._runner = web.AppRunner(self.app, access_log=None, keepalive_timeout=self.policy.header_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the port picked when port == 0
        self.host = host
        return self.port

    async def announce(self, interfaces: list[str], *, identity, name: str) -> None:
        """Announce this API by mDNS (`_mesh-api._tcp`) where it is reachable, for `mesh run`;
        the record is signed with the node's key (``identity``)."""
        from mesh.http.discovery import ApiAnnouncer, reachable_on

        where = reachable_on(self.host, interfaces)
        if not where or self.port is None:
            return
        self._announcer = ApiAnnouncer(where, self.port, identity=identity, name=name,
                                       model=self.backend.model_name, needs_key=bool(self.api_key))
        try:
            await self._announcer.start()
        except OSError as exc:  # mDNS is a convenience: the API serves without it
            log.warning("api.announce_failed", interfaces=where, error=str(exc))
            self._announcer = None

    async def stop(self) -> None:
        if self._announcer is not None:
            await self._announcer.stop()
            self._announcer = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._tokenize.shutdown(wait=False, cancel_futures=True)

    # -- middleware -------------------------------------------------------------------

    @web.middleware
    async def _count(self, request: web.Request, handler):
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        response = await handler(request)
        key = (route, response.status)
        self.stats.requests[key] = self.stats.requests.get(key, 0) + 1
        return response

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """Host, CORS preflight, key, then origin and content type (see mesh.http.guard)."""
        try:
            self.guard.check_host(request.headers)
            if request.method == "OPTIONS":
                return web.Response(status=204, headers=self.guard.preflight(request.headers))
            if not self.guard.authorized(request.headers, request.cookies):
                if request.method == "GET" and request.path == "/":
                    return self._dashboard_login(request)
                self.guard.check_auth(request.headers, request.cookies)
            self.guard.check_state_change(request.method, request.headers)
        except Refused as exc:
            log.info("api.refused", status=exc.status, code=exc.code, path=request.path,
                     host=request.headers.get("Host"), origin=request.headers.get("Origin"), peer=request.remote)
            kind = "invalid_request_error" if exc.status != 401 else "authentication_error"
            response = _error(exc.status, str(exc), kind, code=exc.code)
            response.headers.update(exc.headers)
            return response
        return await handler(request)

    def _dashboard_login(self, request: web.Request) -> web.Response:
        """The dashboard asks for the key once: ``/?key=KEY`` sets a cookie that holds a MAC of it."""
        key = request.query.get("key")
        if key is not None and self.guard.key_matches(key):
            response = web.Response(status=303, headers={"Location": "/"})
            response.set_cookie(COOKIE, dashboard_cookie(self.api_key), httponly=True, samesite="Strict", path="/")
            return response
        wrong = "<p class=error>That key is wrong.</p>" if key is not None else ""
        return web.Response(status=401, content_type="text/html", text=_LOGIN.replace("{wrong}", wrong))

    async def _cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = self.guard.cors_origin(request.headers)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 404:
                return _error(404, f"no route {request.method} {request.path}", "invalid_request_error",
                              code="not_found")
            if exc.status == 405:
                return _error(405, f"method {request.method} not allowed on {request.path}",
                              "invalid_request_error")
            if exc.status == 413:
                return _error(413, f"the request body is larger than {self.policy.max_body_bytes} bytes",
                              "invalid_request_error", code="request_too_large")
            raise
        except Refused as exc:
            return _error(exc.status, str(exc), "invalid_request_error", code=exc.code)
        except ClientGone:
            return web.Response(status=499, text="client closed request")  # no one reads it; counted in /metrics
        except TooBusy as exc:
            response = _error(429, f"this node is busy: {exc}", "rate_limit_error", code="too_many_requests")
            response.headers["Retry-After"] = "1"
            return response
        except FieldError as exc:
            return _bad(str(exc), param=exc.param)
        except BadRequest as exc:
            return _bad(str(exc))
        except Unavailable as exc:
            return _error(503, str(exc), "service_unavailable", code="cluster_unavailable")
        except MeshError as exc:
            return _error(500, f"{type(exc).__name__}: {exc}", "server_error")
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # a bug must still answer in OpenAI's shape, and the node keeps serving
            log.exception("api.internal_error", path=request.path)
            return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    # -- read-only endpoints ----------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_DIR / "index.html")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.backend.model_name, "object": "model", "created": 0, "owned_by": "mesh"}]})

    async def cluster(self, request: web.Request) -> web.Response:
        return web.json_response(self.backend.status())

    async def admit(self, request: web.Request) -> web.Response:
        """`mesh admit PREFIX`: approve a key waiting to join (`--admit ask`). This node tells
        the coordinator over the authenticated link; the admission shows in /v1/cluster."""
        from mesh.cluster.admission import AdmissionError

        body = await self._body(request)
        key = body.get("key")
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise FieldError("key", "'key' must be a node id or the prefix of a pending one")
        try:
            node_id = await self.backend.admit(key)
        except AdmissionError as exc:
            return _error(409, str(exc), "invalid_request_error", code="not_admitted")
        except ActorsError as exc:  # the ask failed, timed out, or the coordinator refused it
            return _error(503, f"the coordinator did not admit the key: {exc}", "service_unavailable",
                          code="cluster_unavailable")
        return web.json_response({"admitted": node_id})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.backend.metrics_text() + self.stats.text(), content_type="text/plain",
                            headers={"Cache-Control": "no-cache"})

    # -- generation -------------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict:
        try:
            raw = await asyncio.wait_for(request.read(), self.policy.body_timeout_s)
        except asyncio.TimeoutError:
            raise Refused(408, "body_timeout", f"the request body did not arrive within "
                                               f"{self.policy.body_timeout_s:g}s") from None
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.backend.model_name:
            raise _NotFoundModel(model)
        return body

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
        except _NotFoundModel as exc:
            return self._unknown_model(exc.model)
        messages = parse_messages(body)
        params, stops = parse_params(body)
        self.guard.check_prompt(sum(len(m["content"].encode()) for m in messages))
        async with self.admission.slot(gone=_client_gone(request)):
            prompt_ids = await self._off_loop(self.backend.encode_chat, messages)
            return await self._respond(request, body, prompt_ids, params, stops, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._body(request)
        except _NotFoundModel as exc:
            return self._unknown_model(exc.model)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise FieldError("prompt", "'prompt' must be a string")
        params, stops = parse_params(body)
        self.guard.check_prompt(len(prompt.encode()))
        async with self.admission.slot(gone=_client_gone(request)):
            prompt_ids = await self._off_loop(self.backend.encode_text, prompt)
            return await self._respond(request, body, prompt_ids, params, stops, chat=False)

    async def _off_loop(self, fn, arg):
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, fn, arg)

    def _observe(self, clock: "_Clock") -> None:
        now = time.perf_counter()
        self.stats.observe("request", now - clock.started)
        if clock.first is not None:
            self.stats.observe("ttft", clock.first - clock.started)

    def _unknown_model(self, model: Any) -> web.Response:
        return _error(404, f"the model {model!r} does not exist; this cluster serves {self.backend.model_name!r}",
                      "invalid_request_error", param="model", code="model_not_found")

    async def _respond(self, request, body, prompt_ids, params, stops, *, chat: bool) -> web.StreamResponse:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        model = self.backend.model_name
        events = self.backend.generate_stream(prompt_ids, params)
        matcher = StopMatcher(stops)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": 0, "total_tokens": len(prompt_ids)}
        if body.get("stream"):
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._stream(request, rid, created, model, events, matcher, usage, chat, prompt_ids,
                                      include_usage=include_usage)
        pieces, finish, token_ids = [], "length", []
        clock = _Clock()
        # The first event surfaces request errors (bad params, no pipeline) as HTTP errors.
        async for event in events:
            clock.tick()
            if not event.stop_token:
                usage["completion_tokens"] += 1
                token_ids.append(event.token_id)
            pieces.append(matcher.feed(event.text))
            if matcher.stopped:
                finish = "stop"
                await events.aclose()
                break
            if event.finish_reason:
                finish = event.finish_reason
        pieces.append(matcher.flush() if not matcher.stopped else "")
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        text = "".join(pieces)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        self._observe(clock)
        info = {**self.backend.mesh_info(), "token_ids": token_ids, "prompt_token_ids": prompt_ids, **clock.as_dict()}
        return web.json_response({"id": rid, "object": obj, "created": created, "model": model,
                                  "choices": [choice], "usage": usage, "mesh": info})

    async def _stream(self, request, rid, created, model, events, matcher, usage, chat,
                      prompt_ids, *, include_usage: bool = False) -> web.StreamResponse:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, *, role: bool = False, tokens: int | None = None) -> bytes:
            if chat:
                delta: dict = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            if tokens is not None:
                payload["mesh"] = {"tokens": tokens}  # tokens streamed so far (a text chunk may hold several)
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        iterator = events.__aiter__()
        clock = _Clock()
        try:
            first = await iterator.__anext__()  # errors before the stream starts stay HTTP errors
        except StopAsyncIteration:
            first = None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        if chat:
            await response.write(chunk(None, None, role=True))
        finish, token_ids = "length", []
        event = first
        try:
            while event is not None:
                clock.tick()
                if not event.stop_token:
                    usage["completion_tokens"] += 1
                    token_ids.append(event.token_id)
                text = matcher.feed(event.text)
                if text:
                    await response.write(chunk(text, None, tokens=len(token_ids)))
                if matcher.stopped:
                    finish = "stop"
                    break
                if event.finish_reason:
                    finish = event.finish_reason
                try:
                    event = await iterator.__anext__()
                except StopAsyncIteration:
                    event = None
            rest = "" if matcher.stopped else matcher.flush()
            if rest:
                await response.write(chunk(rest, None))
            self._observe(clock)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            final = json.loads(chunk(None, finish)[6:])
            final["usage"] = usage
            final["mesh"] = {**self.backend.mesh_info(), "token_ids": token_ids, "prompt_token_ids": prompt_ids,
                             **clock.as_dict()}
            await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
            if include_usage:  # OpenAI's shape: one last chunk with no choices and the usage
                tail = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}
                await response.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
        except MeshError as exc:
            err = {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error", "param": None,
                             "code": None}}
            await response.write(b"data: " + json.dumps(err).encode() + b"\n\n")
        finally:
            await iterator.aclose()
        await response.write_eof()
        return response


class _Clock:
    """Server-side timing of one request: time to first token and decode time."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now

    def as_dict(self) -> dict:
        if self.first is None:
            return {"ttft_s": None, "decode_s": None}
        return {"ttft_s": self.first - self.started, "decode_s": self.last - self.first}


class _NotFoundModel(Exception):
    def __init__(self, model: Any):
        self.model = model


_LOGIN = """<!doctype html><meta charset=utf-8><title>mesh: API key</title>
<style>body{font:15px system-ui;margin:4em auto;max-width:28em}.error{color:#b00}</style>
<h1>mesh</h1><p>This node's API needs its key (<code>--api-key</code>). It is asked once: the
browser then keeps a cookie that proves it.</p>{wrong}
<form method=get action="/"><input name=key type=password autofocus size=40> <button>Open the dashboard</button></form>
"""
