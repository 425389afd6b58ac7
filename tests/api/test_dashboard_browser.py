"""The dashboard in real headless Chromium (Debian's /usr/bin/chromium, driven by playwright):
it shows the three nodes and the layer map of a running 3-node mesh, and a chat typed into it
streams an answer. Saves tests/artifacts/dashboard.png."""

from __future__ import annotations

import shutil
import tempfile

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which("chromium") and not shutil.os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    profile = tempfile.mkdtemp(prefix="mesh-chromium-")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                        args=FLAGS, viewport={"width": 1400, "height": 900})
        try:
            yield context.new_page()
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def test_dashboard_shows_the_mesh_and_streams_a_chat(mesh3, page, artifacts):
    page.goto(mesh3.nodes[0].api + "/", wait_until="domcontentloaded")
    page.wait_for_function("document.querySelectorAll('#nodes tr.node').length === 3", timeout=20_000)
    page.wait_for_function("document.querySelectorAll('#layer-map .stage').length === 3", timeout=20_000)

    names = sorted(page.locator("#nodes tr.node td:nth-child(2)").all_inner_texts())
    assert names == ["node0", "node1", "node2"]
    stages = page.locator("#layer-map .stage").all_inner_texts()
    assert [s.split("·")[0].strip() for s in stages] == ["stage 0", "stage 1", "stage 2"]
    assert "layers 0–" in stages[0] and "–29" in stages[2]
    view = mesh3.view
    assert page.locator("#coordinator").inner_text().startswith(view["coordinator"][:8])
    assert page.locator("#nodes").inner_text().count("coordinator") == 1

    page.evaluate("""() => { window.__updates = 0;
        new MutationObserver(() => window.__updates++).observe(document.getElementById('chat-output'),
            {childList: true, characterData: true, subtree: true}); }""")
    page.fill("#chat-input", "Write one sentence about the sea.")
    page.click("#chat-send")
    page.wait_for_function("document.getElementById('chat-meta').textContent.includes('done')", timeout=120_000)
    answer = page.locator("#chat-output").inner_text()
    assert len(answer.strip()) > 10, page.locator("#chat-meta").inner_text()
    assert page.evaluate("window.__updates") > 1  # it arrived in pieces: streamed, not in one block
    page.wait_for_function("Number(document.getElementById('m-tokens').textContent) > 0", timeout=10_000)
    page.screenshot(path=str(artifacts / "dashboard.png"), full_page=True)
    assert (artifacts / "dashboard.png").stat().st_size > 10_000
