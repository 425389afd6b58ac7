"""A real aiohttp server of `mesh.http.app.Api` on loopback, over a fake backend that
records what reaches it: the defences are tested without a model or a cluster."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from mesh.generation import TokenEvent
from mesh.http.app import Api
from mesh.http.guard import ApiPolicy


@dataclass
class FakeBackend:
    model_name: str = "fake-model"
    encode_s: float = 0.0           # how long tokenizing blocks its thread (the real tokenizer releases the GIL)
    release: asyncio.Event | None = None  # generations wait on it before their token
    tokens: int = 2
    generations: int = 0
    encoded: list = field(default_factory=list)
    members: list = field(default_factory=lambda: ["n1"])  # the node ids /v1/cluster reports

    def status(self) -> dict:
        return {"self": self.members[0], "coordinator": self.members[0], "term": 1,
                "nodes": [{"id": m} for m in self.members], "plan": None}

    def encode_chat(self, messages):
        return self.encode_text("".join(m["content"] for m in messages))

    def encode_text(self, text: str):
        if self.encode_s:
            time.sleep(self.encode_s)
        self.encoded.append(len(text))
        return [1, 2, 3]

    async def generate_stream(self, prompt_ids, params):
        self.generations += 1
        if self.release is not None:
            await self.release.wait()
        for i in range(self.tokens):
            yield TokenEvent(i, 10 + i, f"t{i} ", finish_reason="length" if i == self.tokens - 1 else None)

    def metrics_text(self) -> str:
        return "mesh_fake 1\n"

    def mesh_info(self) -> dict:
        return {}


class Served:
    def __init__(self, api: Api, backend: FakeBackend):
        self.api, self.backend = api, backend
        self.url = f"http://127.0.0.1:{api.port}"
        self.port = api.port


@pytest.fixture
async def serve():
    """``await serve(policy=..., api_key=..., backend=...)`` starts an Api; all are stopped at the end."""
    started: list[Api] = []

    async def start(*, policy: ApiPolicy | None = None, api_key: str | None = None,
                    backend: FakeBackend | None = None, hosts=("127.0.0.1",)) -> Served:
        backend = backend or FakeBackend()
        api = Api(backend, api_key=api_key, policy=policy, hosts=list(hosts))
        await api.start("127.0.0.1", 0)
        started.append(api)
        return Served(api, backend)

    yield start
    for api in started:
        if api.backend.release is not None:
            api.backend.release.set()  # a failed test must not leave a generation waiting forever
        await api.stop()
