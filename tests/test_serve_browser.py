"""The prompt inspector in a real headless Chromium (Debian's ``chromium``, driven by Playwright): what the page
renders equals what ``/v1/tokenize`` returns, and the comparison heatmap equals ``/v1/compare``."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(
        "Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)", allow_module_level=True
    )

import uvicorn  # noqa: E402
from serving import free_port, wait_ready  # noqa: E402

import sdclip  # noqa: E402
from sdclip.serve import ServeConfig, create_app  # noqa: E402

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = Path(os.environ.get("SDCLIP_SCREENSHOTS", "out/screenshots"))


@pytest.fixture(scope="module")
def server():
    port = free_port()
    config = uvicorn.Config(
        create_app(ServeConfig(models={"sdclip-mini": sdclip.load()})), host="127.0.0.1", port=port, log_level="warning"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, 30)
    yield base
    srv.should_exit = True
    thread.join(10)


def _api(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def test_inspector_renders_what_tokenize_returns(server, tmp_path):
    prompt = "masterpiece, (best quality:1.3), " * 6 + "a [red] star above a (blue:0.8) square BREAK a cat"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            requests_out: list[str] = []
            page.on("request", lambda r: requests_out.append(r.url))
            page.goto(server + "/")
            page.wait_for_selector("body[data-state=ready]")
            page.select_option("#dialect", "a1111")
            page.fill("#prompt", "")
            page.evaluate("document.body.dataset.state = ''")
            page.type("#prompt", prompt, delay=0)
            page.wait_for_function(
                "document.body.dataset.state === 'ready' && "
                f"document.getElementById('prompt').value.length === {len(prompt)}"
            )
            page.wait_for_timeout(400)  # the last keystroke's request has answered
            page.wait_for_selector("body[data-state=ready]")
            expected = _api(server, "/v1/tokenize", {"prompt": prompt, "dialect": "a1111"})["chunks"]
            chunks = page.query_selector_all(".chunk")
            assert len(chunks) == len(expected["chunks"]) == 2
            assert page.get_attribute("#summary", "data-chunks") == "2"
            for box, want in zip(chunks, expected["chunks"]):
                spans = box.query_selector_all(".tok")
                assert [int(s.get_attribute("data-id")) for s in spans] == [t["id"] for t in want["tokens"]]
                assert [float(s.get_attribute("data-weight")) for s in spans] == [t["weight"] for t in want["tokens"]]
                assert [s.text_content() for s in spans] == [t["text"] for t in want["tokens"]]
            heavy = page.query_selector_all(".tok[data-weight='1.3']")
            assert heavy and heavy[0].evaluate("e => getComputedStyle(e).backgroundColor") != "rgb(236, 239, 244)"
            # the comparison heatmap: one row per hidden state, one cell per position
            page.click("#cmp-go")
            page.wait_for_selector("table.heat td")
            want = _api(server, "/v1/compare", {"a": page.input_value("#cmp-a"), "b": page.input_value("#cmp-b")})
            cells = page.query_selector_all("table.heat td")
            assert len(cells) == len(want["layers"]) * want["positions"]
            assert [float(c.get_attribute("data-cosine")) for c in cells] == [v for row in want["cosine"] for v in row]
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "inspector.png"), full_page=True)
            assert (SHOTS / "inspector.png").stat().st_size > 10_000
            assert all(u.startswith(server) for u in requests_out), [
                u for u in requests_out if not u.startswith(server)
            ]
        finally:
            browser.close()
