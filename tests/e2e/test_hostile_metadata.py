"""Hostile input in a real browser: metadata that is Markdown/HTML, and clients that have no token.

A tiny model is trained on a folder whose metadata would, unescaped, draw an image from another
origin (a "beacon" HTTP server of the test), run an ``onerror`` handler, break out of code spans
and emphasise file names. The browser records every request it makes: only the app's own origin
(and inline ``data:`` images) may appear, the beacon must hear nothing, and the values must read
literally on the pages that show metadata (Attribute, Training data). Then the access rules:
a fresh server with ``DTRAK_TOKEN`` asks for it even when the first request names a page, and a
server on every interface without a token refuses to serve.
"""

from __future__ import annotations

import contextlib
import csv
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from dtrak_app.text import WORD_JOINER
from tests.app.conftest import FAST, REPO, build_app_env
from tests.e2e.test_browser import ARGS, CHROMIUM, free_port, settled, wait_until_serving
from tests.e2e.test_browser import pytestmark as browser_mark

pytestmark = browser_mark  # as the other browser test: skipped without chromium, except under CI

TOKEN = "e2e-token-0123456789abcdef"


class Beacon:
    """An HTTP server on another origin that records every path requested from it."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the standard library's name)
                hits.append(self.path)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def hostile_values(port: int) -> dict[str, str]:
    beacon = f"http://127.0.0.1:{port}"
    return {
        "artist": f"![b]({beacon}/beacon)",
        "artist2": f"**bold** <img src={beacon}/img> :red[x] $x$ www.evil.example",
        "name": f"na`me` `` <img src={beacon}/onerror onerror=alert(1)> [link]({beacon}/link)",
        "folder": "d_[1]*",
    }


def write_hostile_folder(root: Path, values: dict[str, str], n: int = 12, size: int = 16) -> Path:
    """``n`` random-blob PNGs named with ``*_[]``, artists and names from ``values``."""
    rng = np.random.default_rng(1)
    folder = root / values["folder"]
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        image = np.full((size, size, 3), 255, np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        image[y:y + size // 2, x:x + size // 2] = rng.integers(0, 255, 3)
        name = f"{values['folder']}/x*_[{i}]_.png"
        Image.fromarray(image).save(root / name)
        artist = values["artist"] if i % 2 == 0 else values["artist2"]
        rows.append((name, artist, f"{values['name']} {i}", "validation" if i == n - 1 else "train"))
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file_name", "artist", "name", "split"))
        writer.writerows(rows)
    return root


@contextlib.contextmanager
def serving(variables: dict[str, str], log: Path, address: str = "127.0.0.1") -> Iterator[str]:
    """``streamlit run app.py`` with ``variables`` set, on ``address``; yields its URL on 127.0.0.1."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", address, "--server.port",
             str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=REPO, env={**os.environ, **variables}, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_serving(url, process)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def browser_page(origin: str) -> Iterator[tuple[object, list[str]]]:
    """A Chromium page and the list of every URL it requests from another origin than ``origin``."""
    from playwright.sync_api import sync_playwright

    foreign: list[str] = []

    def record(request) -> None:
        parts = urlsplit(request.url)
        if parts.scheme not in ("data", "blob") and f"{parts.scheme}://{parts.netloc}" != origin:
            foreign.append(request.url)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.on("request", record)
            yield page, foreign
        finally:
            browser.close()


def read(texts: list[str]) -> str:
    """Rendered text as it reads (the escape's invisible word joiners removed)."""
    return "\n".join(texts).replace(WORD_JOINER, "")


def no_foreign_markup(page, origin: str) -> None:
    """No image or link in the app's content points at another origin, and nothing ran."""
    sources = page.evaluate("""() => [...document.querySelectorAll(
        '[data-testid="stMain"] img, [data-testid="stSidebar"] img')].map(e => e.src)""")
    assert all(s.startswith(("data:", origin)) for s in sources), sources
    links = page.evaluate("""() => [...document.querySelectorAll(
        '[data-testid="stMain"] a[href], [data-testid="stSidebar"] a[href]')].map(e => e.href)""")
    assert all(h.startswith(origin) for h in links), links
    assert page.evaluate("() => window.__pwned === undefined")


@pytest.fixture
def beacon():
    server = Beacon()
    yield server
    server.close()


def test_hostile_metadata_shows_literally_and_requests_nothing_elsewhere(tmp_path, beacon):
    from playwright.sync_api import expect

    values = hostile_values(beacon.port)
    env = build_app_env(tmp_path, write_hostile_folder(tmp_path / "data", values))
    with serving(env.variables(), tmp_path / "streamlit.log") as url, browser_page(url) as (page, foreign):
        page.add_init_script("window.alert = () => { window.__pwned = true; }")
        page.goto(f"{url}/?K={FAST['K']}&k={FAST['k']}", timeout=90_000)
        expect(page.get_by_text("The training images that made this image most likely")).to_be_visible(timeout=90_000)
        settled(page)
        page.wait_for_function("""() => [...document.querySelectorAll('[data-testid="stImage"] img')]
                                 .every(img => img.complete)""", timeout=90_000)
        assert foreign == [] and beacon.hits == []  # first the security property, then the wording
        captions = read(page.locator('[data-testid="stCaptionContainer"]').all_inner_texts())
        for artist in (values["artist"], values["artist2"]):
            assert artist in captions, captions
        assert captions.count(values["name"]) == 10, captions  # the proponents are named by "name"
        # A name's help tooltip gives the file name, literally too.
        page.locator('[data-testid="stCaptionContainer"]', has_text="na`me` ``").first.locator(
            '[data-testid="stTooltipIcon"], [data-testid="stTooltipHoverTarget"]').first.hover()
        tooltip = page.locator('[data-testid="stTooltipContent"]').first
        expect(tooltip).to_be_visible(timeout=30_000)
        assert f"file {values['folder']}/x*_[" in read([tooltip.inner_text()])
        no_foreign_markup(page, url)

        page.get_by_role("link", name="Training data").first.click(timeout=90_000)
        expect(page.get_by_text("Which generated samples does it support?")).to_be_visible(timeout=90_000)
        settled(page)
        shown = read(page.locator('[data-testid="stImageCaption"]').all_inner_texts())
        assert f"0: {values['folder']}/x*_[0]_.png {values['name']} 0" in shown, shown
        no_foreign_markup(page, url)
        assert page.locator('[data-testid="stException"]').count() == 0
    assert foreign == [] and beacon.hits == []


def no_model(tmp_path: Path, token: str) -> dict[str, str]:
    return {"DTRAK_HIDE_DEMO": "1", "DTRAK_MODEL_DIR": "", "DTRAK_CACHE": str(tmp_path / "cache"),
            "DTRAK_TOKEN": token}


def test_a_fresh_server_asks_for_the_token_even_when_a_page_is_asked_first(tmp_path):
    # On a fresh server Streamlit runs a file of pages/ directly (without app.py) until app.py has
    # run once: the first request names a page here, so only the page's own check stands in the way.
    from playwright.sync_api import expect

    with serving(no_model(tmp_path, TOKEN), tmp_path / "streamlit.log") as url, browser_page(url) as (page, foreign):
        page.goto(f"{url}/jobs", timeout=90_000)
        expect(page.get_by_label("Access token", exact=True)).to_be_visible(timeout=90_000)
        settled(page)
        assert page.get_by_text("Long work runs as separate processes").count() == 0
        page.goto(f"{url}/jobs?token=wrong-{TOKEN}", timeout=90_000)
        expect(page.get_by_text("That token is not the one this server was started with.")).to_be_visible(
            timeout=90_000)
        page.goto(f"{url}/jobs?token={TOKEN}", timeout=90_000)
        expect(page.get_by_text("Long work runs as separate processes")).to_be_visible(timeout=90_000)
        settled(page)
        assert "token" not in page.url  # the URL never keeps it
    assert foreign == []


def test_every_interface_without_a_token_is_refused(tmp_path):
    from playwright.sync_api import expect

    with serving(no_model(tmp_path, ""), tmp_path / "streamlit.log", address="0.0.0.0") as url, \
            browser_page(url) as (page, foreign):
        for path in ("/", "/jobs"):
            page.goto(f"{url}{path}", timeout=90_000)
            expect(page.get_by_text("dtrak refuses to serve: it listens on 0.0.0.0")).to_be_visible(timeout=90_000)
            settled(page)
            assert page.get_by_text("Long work runs as separate processes").count() == 0
    assert foreign == []
