"""The first screen, in a real browser, as someone who has never heard of attribution sees it:
training images named (not file names; the file on hover), scores as relative strength, the
artist chart with each artist's share of the training data as a baseline, and the method and
its settings in a collapsed "Advanced" panel with one-line explanations.

Needs Debian's chromium (see tests/e2e/test_browser.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.app.conftest import FAST, REPO, build_app_env
from tests.conftest import write_image_folder
from tests.e2e.test_browser import ARGS, CHROMIUM, free_port, settled, wait_until_serving

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                                reason="chromium is not installed (see .ci/run)")

#: The training images' names (metadata "name"), as emoji3 names its emoji.
NAMES = ["grinning cat", "red apple", "blue whale", "snow flake", "paper boat", "green tree"]


@pytest.fixture
def server(tmp_path):
    data = write_image_folder(tmp_path / "data", n=24)
    meta = pd.read_csv(data / "metadata.csv")
    meta["name"] = [f"{NAMES[i % len(NAMES)]} {i}" for i in range(len(meta))]
    meta.to_csv(data / "metadata.csv", index=False)
    env = build_app_env(tmp_path, data)
    port = free_port()
    log = open(tmp_path / "streamlit.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env={**os.environ, **env.variables()}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process)
        yield url, meta
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_first_screen_names_strengths_artist_baseline_and_advanced_panel(server):
    from playwright.sync_api import expect, sync_playwright

    url, meta = server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.goto(f"{url}/?K={FAST['K']}&k={FAST['k']}", timeout=90_000)
            expect(page.get_by_text("The training images that made this image most likely")).to_be_visible(
                timeout=90_000)
            settled(page)
            assert page.locator('[data-testid="stException"]').count() == 0
            assert page.get_by_text("not ready yet").count() == 0  # D-TRAK itself, not the pixel fallback

            # Named tiles: the ten proponents carry names from the metadata, never file names.
            captions = [c.inner_text().strip() for c in page.locator('[data-testid="stCaptionContainer"]').all()]
            named = [c for c in captions if c in set(meta["name"])]
            assert len(named) == 10, captions
            assert not [c for c in captions if c.endswith(".png")], captions
            # The file name is on hover (the name's help icon).
            first = page.locator('[data-testid="stCaptionContainer"]', has_text=named[0]).first
            first.locator('[data-testid="stTooltipIcon"], [data-testid="stTooltipHoverTarget"]').first.hover()
            file_name = meta.loc[meta["name"] == named[0], "file_name"].item()
            expect(page.get_by_text(f"file {file_name}")).to_be_visible(timeout=30_000)

            # Relative strength, not raw scores: the top proponent is 100% of the strongest score.
            strengths = [c for c in captions if c.startswith("#")]
            assert strengths[0].startswith("#1 · strength 100%"), strengths
            assert all("strength" in c and "%" in c for c in strengths)

            # The artist chart draws each artist's share of the training data as a baseline marker.
            chart = page.locator(".js-plotly-plot", has_text="share of the training data")
            expect(chart).to_have_count(1)
            baseline = chart.locator(".scatterlayer .trace .point")
            assert baseline.count() == 2  # artists a and b
            assert page.get_by_text("contributed").count() >= 1 and page.get_by_text("their share").count() >= 1

            # The Advanced panel: collapsed at first, then method, K, k and lambda with one-line explanations.
            k_input = page.get_by_label("K timesteps", exact=True)
            expect(k_input).to_be_hidden()
            page.get_by_text("Advanced: method, K, k, lambda").click()
            expect(k_input).to_be_visible(timeout=30_000)
            for line in ("How the scores are computed.", "Noise levels each gradient is averaged over",
                         "Numbers kept per image from its gradient", "Ridge regularisation",
                         "Calibrated for this model."):
                expect(page.get_by_text(line, exact=False).first).to_be_visible()
            assert page.locator('[data-testid="stException"]').count() == 0
        finally:
            browser.close()
