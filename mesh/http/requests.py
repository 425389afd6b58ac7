"""OpenAI request parsing and checks for the HTTP API: typed fields, messages, stop strings,
and the HTTP-level counters /metrics adds. Pure functions and objects; no I/O."""

from __future__ import annotations

from typing import Any

from mesh.generation import GenerationParams

ROLES = ("system", "developer", "user", "assistant", "tool")


class FieldError(Exception):
    """A request field has the wrong type or value; ``param`` names it (OpenAI's error ``param``)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


_NUMBER = (int, float)


def _field(body: dict, name: str, kinds: tuple, default: Any) -> Any:
    if name not in body or body[name] is None:
        return default
    value = body[name]
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise FieldError(name, f"'{name}' must be of type {'/'.join(k.__name__ for k in kinds)}")
    return value


def parse_params(body: dict) -> tuple[GenerationParams, list[str]]:
    _field(body, "stream", (bool,), False)
    if _field(body, "n", (int,), 1) != 1:
        raise FieldError("n", "'n' must be 1: a mesh generates one choice per request")
    if body.get("logprobs") not in (None, False, 0):
        raise FieldError("logprobs", "'logprobs' is not supported by this server")
    max_tokens = _field(body, "max_tokens", (int,), None)
    if max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", (int,), 128)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise FieldError("stop", "'stop' must be a string or a list of up to 4 strings")
    temperature = float(_field(body, "temperature", _NUMBER, 0.0))
    top_p = float(_field(body, "top_p", _NUMBER, 1.0))
    top_k = int(_field(body, "top_k", (int,), 0))
    if not 0 <= temperature <= 2:
        raise FieldError("temperature", "'temperature' must be between 0 and 2")
    if not 0 < top_p <= 1:
        raise FieldError("top_p", "'top_p' must be in (0, 1]")
    if top_k < 0:
        raise FieldError("top_k", "'top_k' must be >= 0")
    if max_tokens < 1:
        raise FieldError("max_tokens", "'max_tokens' must be at least 1")
    params = GenerationParams.create(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                     seed=int(_field(body, "seed", (int,), 0)))
    return params, stops


def _text_content(content: Any) -> str | None:
    """A message's content as text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise FieldError(f"messages[{i}].role", f"messages[{i}] needs a 'role', one of {', '.join(ROLES)}")
        text = _text_content(m.get("content"))
        if text is None:
            raise FieldError(f"messages[{i}].content",
                              f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": m["role"], "content": text})
    return out


class HttpStats:
    """Request counts by route and status, and latency histograms, for /metrics."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.hist: dict[str, list[int]] = {"request": [0] * len(self.BUCKETS), "ttft": [0] * len(self.BUCKETS)}
        self.sums = {"request": 0.0, "ttft": 0.0}
        self.counts = {"request": 0, "ttft": 0}

    def observe(self, kind: str, seconds: float) -> None:
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                self.hist[kind][i] += 1
        self.sums[kind] += seconds
        self.counts[kind] += 1

    def text(self) -> str:
        lines = ["# HELP mesh_http_requests_total HTTP requests by route and status code",
                 "# TYPE mesh_http_requests_total counter"]
        for (route, code), n in sorted(self.requests.items()):
            lines.append(f'mesh_http_requests_total{{route="{route}",code="{code}"}} {n}')
        for kind, help_text in (("request", "generation request duration (until the last token)"),
                                ("ttft", "time from request to first token")):
            name = f"mesh_http_{kind}_seconds"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
            for bound, n in zip(self.BUCKETS, self.hist[kind]):
                lines.append(f'{name}_bucket{{le="{bound}"}} {n}')
            lines += [f'{name}_bucket{{le="+Inf"}} {self.counts[kind]}', f"{name}_sum {self.sums[kind]:.6f}",
                      f"{name}_count {self.counts[kind]}"]
        return "\n".join(lines) + "\n"


class StopMatcher:
    """Holds back text that could be the start of a stop string; cuts at the first match."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at = min(h[0] for h in hits)
            out, self.pending, self.stopped = self.pending[:at], "", True
            return out
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
