"""A small streaming client of a node's OpenAI-compatible API (for `mesh run` and `mesh demo`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from mesh.errors import MeshError


class ApiError(MeshError):
    pass


@dataclass
class StreamResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    chunks: int = 0
    mesh: dict = field(default_factory=dict)


async def stream_chat(api: str, prompt: str, *, max_tokens: int = 128, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int = 0, raw: bool = False, api_key: str | None = None,
                      on_text: Callable[[str], None] | None = None, on_tokens: Callable[[int], None] | None = None,
                      timeout: float = 600.0) -> StreamResult:
    """Stream one answer; ``on_text`` gets text as it arrives, ``on_tokens`` the tokens streamed so far."""
    body: dict = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                  "stream": True}
    if raw:
        path, body["prompt"] = "/v1/completions", prompt
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = StreamResult()
    started = time.perf_counter()
    first_at = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async with http.post(api.rstrip("/") + path, json=body, headers=headers) as resp:
            if resp.status != 200:
                try:
                    err = (await resp.json())["error"]["message"]
                except Exception:
                    err = await resp.text()
                raise ApiError(f"{resp.status}: {err}")
            async for raw_line in resp.content:
                line = raw_line.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    raise ApiError(obj["error"]["message"])
                choice = obj["choices"][0]
                text = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                if text:
                    if first_at is None:
                        first_at = time.perf_counter()
                    result.text += text
                    if on_text:
                        on_text(text)
                result.chunks += 1
                tokens = obj.get("mesh", {}).get("tokens")
                if on_tokens and tokens is not None:
                    on_tokens(tokens)
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
                if "mesh" in obj:
                    result.mesh = obj["mesh"]
    ended = time.perf_counter()
    result.token_ids = list(result.mesh.get("token_ids", []))
    result.prompt_token_ids = list(result.mesh.get("prompt_token_ids", []))
    first_token_s = result.mesh.get("ttft_s")
    result.ttft_s = first_token_s if first_token_s is not None else ((first_at or ended) - started)
    n = len(result.token_ids)
    decode_s = result.mesh.get("decode_s")
    if decode_s is None:
        decode_s = ended - (first_at or ended)
    result.decode_tokens_per_s = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
    return result
