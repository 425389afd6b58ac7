"""The examples run as a user would run them, and print what they promise."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                         timeout=240, cwd=EXAMPLES.parent)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_embedded_node_example(model_path):
    text = run_example("embedded_node.py", "Say one word about rivers.")
    assert re.search(r"^node [0-9a-f]{16} ready: 1 stage\(s\), API on http://127\.0\.0\.1:\d+$", text, re.M), text
    answer = re.search(r"^answer: (.+)$", text, re.M)
    assert answer and answer.group(1).strip(), text
    tokens = re.search(r"^tokens: (\d+) in [\d.]+s$", text, re.M)
    assert tokens and 0 < int(tokens.group(1)) <= 32, text
    ticks = re.search(r"^app ticks during generation: (\d+), longest gap (\d+) ms$", text, re.M)
    assert ticks and int(ticks.group(1)) > 1, text  # the app's own task ran while the node generated
    assert text.rstrip().endswith("node stopped")


def test_openai_local_cluster_example(model_path):
    text = run_example("openai_local_cluster.py")
    assert "3 nodes ready; OpenAI API at http://127.0.0.1:" in text
    assert "models: ['smollm2-135m']" in text
    assert re.search(r"^answer: \S", text, re.M), text
    assert len(re.findall(r"^  layers \d+-\d+ on node [0-9a-f]{8}$", text, re.M)) == 3, text
    assert re.search(r"^streamed: \S", text, re.M), text
