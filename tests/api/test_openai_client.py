"""The official `openai` package against a 3-node mesh: same tokens as `mesh generate`,
OpenAI shapes, and OpenAI-shaped errors with the right codes after which the node serves on."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from api_settings import API_KEY, MAX_TOKENS, PROMPT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
MODEL = "smollm2-135m"


def client(mesh3, index: int = 0, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh3.nodes[index].api + "/v1", api_key=key, max_retries=0, timeout=120)


def raw_post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def chat(c: openai.OpenAI, **kw):
    kw = {"max_tokens": MAX_TOKENS, "temperature": 0, **kw}
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}], **kw)


def assert_serving(mesh3, index: int = 0, key: str = "unused") -> None:
    out = client(mesh3, index, key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens >= 1


def test_chat_completion_matches_mesh_generate(mesh3, reference):
    out = chat(client(mesh3, 0))
    extra = out.model_extra["mesh"]
    assert extra["token_ids"] == reference["token_ids"]
    assert extra["prompt_token_ids"] == reference["prompt_token_ids"]
    assert out.choices[0].message.content == reference["text"]
    assert out.object == "chat.completion" and out.model == MODEL and out.id.startswith("chatcmpl-")
    assert out.choices[0].finish_reason == reference["finish_reason"]
    assert out.usage.prompt_tokens == len(reference["prompt_token_ids"])
    assert out.usage.completion_tokens == len(reference["token_ids"])
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert len(extra["pipeline"]) == 3 and extra["coordinator"] and extra["term"] >= 1
    assert {"verification", "failovers"} <= set(extra)


def test_streaming_chat_matches_mesh_generate(mesh3, reference):
    chunks = list(chat(client(mesh3, 1), stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["text"]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert finals[0].model_extra["mesh"]["token_ids"] == reference["token_ids"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(reference["token_ids"])
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed


def test_models_list(mesh3):
    models = client(mesh3, 0).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_completions_endpoint_and_seed(mesh3):
    c = client(mesh3, 1)
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0.9, seed=7)
    a, b = c.completions.create(**kw), c.completions.create(**kw)
    assert a.object == "text_completion" and a.choices[0].text
    assert a.model_extra["mesh"]["token_ids"] == b.model_extra["mesh"]["token_ids"]
    assert a.usage.completion_tokens == len(a.model_extra["mesh"]["token_ids"])


def test_stop_sequence_cuts_the_answer(mesh3, reference):
    words = reference["text"].split()
    assert len(words) > 3, reference["text"]
    stop = words[2]
    out = chat(client(mesh3, 0), stop=[stop])
    text = out.choices[0].message.content
    assert stop not in text and reference["text"].startswith(text)
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client(mesh3, 0), stop=stop, stream=True)
                       if c.choices)
    assert streamed == text


def test_unknown_model_is_404(mesh3):
    with pytest.raises(openai.NotFoundError) as err:
        client(mesh3, 0).chat.completions.create(model="gpt-99", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert_serving(mesh3, 0)


def test_max_tokens_too_large_is_400(mesh3):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client(mesh3, 0), max_tokens=10_000_000)
    assert err.value.status_code == 400 and "max_tokens" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        chat(client(mesh3, 0), max_tokens=10_000_000, stream=True)
    assert_serving(mesh3, 0)


@pytest.mark.parametrize("body", [
    b'{"model": "smollm2-135m", "messages": [',                     # malformed JSON
    b'[1, 2, 3]',                                                       # not an object
    b'{"messages": "hello"}',                                           # messages: wrong type
    b'{"messages": [{"role": "user", "content": 5}]}',                 # content: wrong type
    b'{"messages": [{"role": "wizard", "content": "hi"}]}',            # unknown role
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}',
    b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": [1]}',
])
def test_bad_requests_are_400_in_openai_shape(mesh3, body):
    status, obj = raw_post(mesh3.nodes[1].api + "/v1/chat/completions", body)
    assert status == 400, obj
    assert set(obj["error"]) == {"message", "type", "param", "code"}
    assert obj["error"]["type"] == "invalid_request_error" and obj["error"]["message"]


def test_node_serves_after_bad_requests(mesh3):
    for body in (b"{", b'{"messages": 1}', b'{"model": "nope", "messages": []}'):
        raw_post(mesh3.nodes[1].api + "/v1/chat/completions", body)
    assert_serving(mesh3, 1)


def test_api_key_required_when_set(mesh3):
    with pytest.raises(openai.AuthenticationError) as err:
        client(mesh3, 2, key="wrong").models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    status, obj = raw_post(mesh3.nodes[2].api + "/v1/chat/completions", b'{"messages": []}')
    assert status == 401 and obj["error"]["code"] == "invalid_api_key"
    assert_serving(mesh3, 2, key=API_KEY)


def test_unknown_route_is_404_in_openai_shape(mesh3):
    status, obj = raw_post(mesh3.nodes[0].api + "/v1/embeddings", b"{}")
    assert status == 404 and obj["error"]["message"]


def test_cluster_view_and_metrics(mesh3):
    with urllib.request.urlopen(mesh3.nodes[0].api + "/v1/cluster", timeout=10) as resp:
        view = json.loads(resp.read())
    assert {"self", "coordinator", "term", "nodes", "plan"} <= set(view)
    assert len(view["nodes"]) == 3 and len(view["plan"]["stages"]) == 3
    assert sorted(n["name"] for n in view["nodes"]) == ["node0", "node1", "node2"]
    with urllib.request.urlopen(mesh3.nodes[0].api + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert resp.headers["Content-Type"].startswith("text/plain")
    for name in ("mesh_tokens_served_total", "mesh_failovers_total", "mesh_audits_total",
                 "mesh_http_requests_total", "mesh_http_ttft_seconds_bucket"):
        assert name in text
