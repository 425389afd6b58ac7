"""The API on the registry's larger models (issue 15), through real `mesh join` processes
on loopback, two stages each:

- qwen2.5-coder-0.5b: `/v1/chat/completions` renders the model's own chat template (with
  the default system prompt Qwen's template adds) and streams exactly the text that
  `mesh generate` gives on one device;
- gemma-3-270m, a base model: a chat request gets a clear 400 that says to use raw
  completion, `/v1/completions` streams exactly `mesh generate --raw`'s text, and the
  node serves on.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from kernels.tokenizer import Tokenizer
from mesh import models
from mesh.http.client import stream_chat
from mesh.testing.launcher import LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
MAX_TOKENS = 16


def _cached(name: str) -> None:
    if not models.is_cached(name):
        pytest.skip(f"{name} is not cached: run `python -m mesh models pull {name}`")


def _generate(model: str, prompt: str, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "mesh", "generate", "--json", "--model", model, "--prompt", prompt,
                          "--max-tokens", str(MAX_TOKENS), *extra], capture_output=True, text=True, timeout=300,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _two_stages(model: str) -> LocalCluster:
    return LocalCluster(n=2, model=model, extra_args=["--speed", "1"])


def test_qwen_chat_completions_use_its_template_and_give_the_single_device_text():
    model, prompt = "qwen2.5-coder-0.5b", "Write a Python one-liner that reverses a string."
    _cached(model)
    expected = _generate(model, prompt)
    with _two_stages(model) as cluster:
        asyncio.run(cluster.wait_ready(timeout=300, stages=2))
        got = asyncio.run(stream_chat(cluster.nodes[1].api, prompt, max_tokens=MAX_TOKENS))
    assert got.text == expected["text"] and got.text.strip()
    # the template's own default system prompt is part of what the model saw
    tokenizer = Tokenizer.from_model(models.resolve(model))
    rendered = tokenizer.decode(expected["prompt_token_ids"], skip_special_tokens=False)
    assert "<|im_start|>system" in rendered and "<|im_start|>assistant" in rendered, rendered


def test_gemma_base_model_refuses_chat_clearly_and_completes_raw_text():
    model, prompt = "gemma-3-270m", "The three primary colours are"
    _cached(model)
    expected = _generate(model, prompt, "--raw")
    with _two_stages(model) as cluster:
        asyncio.run(cluster.wait_ready(timeout=300, stages=2))
        api = cluster.nodes[0].api
        status, body = _post(api + "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": prompt}], "max_tokens": 4})
        got = asyncio.run(stream_chat(api, prompt, max_tokens=MAX_TOKENS, raw=True))
    assert status == 400, body
    message = body["error"]["message"]
    assert "chat template" in message and "/v1/completions" in message, message
    assert got.text == expected["text"] and got.text.strip()
