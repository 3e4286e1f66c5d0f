"""The first page load after ``make run`` shows real D-TRAK results, not the pixel fallback.

``python -m dtrak_app.prepare`` (what ``make run`` runs before serving) prepares a fresh cache
for the default model; a second run changes nothing. Then a fresh browser session opens the
app with no link parameters (the default settings): the Attribute page must show D-TRAK's
results at once, with no "not ready" notice, no Start button and no pixel-similarity fallback.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dtrak_app.common import DEFAULTS
from tests.app.conftest import REPO, build_app_env
from tests.e2e.test_browser import ARGS, CHROMIUM, free_port, settled, wait_until_serving
from tests.e2e.test_browser import pytestmark as browser_mark
from tests.reliability.harness import snapshot

pytestmark = browser_mark  # as the other browser tests: skipped without chromium, except under CI


def prepare(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "dtrak_app.prepare", "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def prepared_server(tmp_path):
    app_env = build_app_env(tmp_path)  # the tiny model; its cache holds features at other settings only
    env = {**os.environ, **app_env.variables(), "OMP_NUM_THREADS": "1"}
    first = prepare(env)
    assert first.startswith(f"prepared tiny: D-TRAK training features (K={DEFAULTS['K']}, k={DEFAULTS['k']}) "
                            "computed 20 of 20; 16 gallery samples sampled; default lambda ")
    before = snapshot(app_env.cache, ignore=(".lock",))
    again = prepare(env)
    assert "20 cached; 16 gallery samples cached" in again
    assert snapshot(app_env.cache, ignore=(".lock",)) == before  # a no-op when done
    port = free_port()
    log = open(tmp_path / "streamlit.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process)
        yield url, app_env
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_the_first_load_shows_dtrak_results(prepared_server):
    from playwright.sync_api import expect, sync_playwright

    url, app_env = prepared_server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(url, timeout=90_000)  # no parameters: the default model, method and settings
            settled(page)
            expect(page.get_by_text("Method: D-TRAK", exact=False).first).to_be_visible(timeout=90_000)
            assert page.locator('[data-testid="stException"]').count() == 0
            body = page.locator('[data-testid="stMain"]').inner_text()
            assert "not ready" not in body and "Meanwhile" not in body, body[:2000]
            assert "Method: raw pixel similarity" not in body
            assert page.get_by_role("button", name="Start computing").count() == 0
            assert f"K={DEFAULTS['K']}" in page.url and f"k={DEFAULTS['k']}" in page.url
        finally:
            browser.close()
    assert not (app_env.cache / "jobs").exists()  # and nothing was started
