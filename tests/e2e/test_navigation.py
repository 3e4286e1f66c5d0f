"""Every page after every other page (all ordered pairs) in Chromium, from a fresh session and
after changing the shared settings; any ``stException`` element fails.

Only a browser shows this failure: Streamlit deletes the session state of a widget that a run
did not draw, and the next page that read it ("k" after About) raised a KeyError. The walk is
the Eulerian circuit of tests/app/test_navigation.py (each ordered pair of pages exactly once).
"""

from __future__ import annotations

import re

from tests.app.conftest import FAST
from tests.app.test_navigation import all_pairs_walk
from tests.e2e.test_browser import ARGS, CHROMIUM, server, settled  # noqa: F401 (server: the fixture)
from tests.e2e.test_browser import pytestmark as browser_mark

pytestmark = browser_mark  # as the other browser tests: skipped without chromium, except under CI

#: The navigation's link texts (app.py), the landing page first, and each page's URL path.
PATHS = {"Attribute": "", "Compare methods": "compare", "Training data": "training_data", "Benchmark": "benchmark",
         "Counterfactual": "counterfactual", "Jobs": "jobs", "About": "about"}
TITLES = tuple(PATHS)


def exceptions(page) -> list[str]:
    return [e.inner_text()[:300] for e in page.locator('[data-testid="stException"]').all()]


def walk_all_pairs(page) -> list[tuple[str, str, list[str]]]:
    """Click through the circuit; (from, to, exception texts) for every move that showed one."""
    titles = [t for t in TITLES if page.get_by_role("link", name=t, exact=True).count()]
    assert titles[0] == "Attribute" and len(titles) >= 5, titles
    walk = all_pairs_walk(titles)
    failures = []
    for before, after in zip(walk, walk[1:]):
        page.get_by_role("link", name=after, exact=True).first.click(timeout=90_000)
        # The new page's URL first (so the run awaited is the new page's), then the end of its run.
        page.wait_for_url(re.compile(rf"^http://[^/]+/{PATHS[after]}(\?.*)?$"), timeout=90_000)
        settled(page)
        if errors := exceptions(page):
            failures.append((before, after, errors))
    return failures


def test_every_page_after_every_other_page_fresh_and_after_changes(server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # A fresh session: the first page drawn is the landing page with the link's settings.
            page.goto(f"{server}/?K={FAST['K']}&k={FAST['k']}", timeout=90_000)
            settled(page)
            # The first run has drawn lambda (the model's calibrated value) before the walk starts.
            expect(page.get_by_label("lambda", exact=True).first).to_have_value(re.compile(r"^[0-9]"),
                                                                                timeout=90_000)
            assert walk_all_pairs(page) == []
            # Change the shared settings (lambda, the target) on the landing page, walk again, and
            # find them kept.
            page.get_by_text("Advanced: method, K, k, lambda").click(timeout=90_000)  # lambda lives there
            lam = page.get_by_label("lambda", exact=True).first
            lam.fill("10")
            lam.press("Enter")
            settled(page)
            page.get_by_role("button", name="seed 3", exact=True).click(timeout=90_000)
            settled(page)
            expect(page.get_by_text("DDIM 50 steps, eta 0, seed 3")).to_be_visible(timeout=90_000)
            assert walk_all_pairs(page) == []
            expect(page.get_by_label("lambda", exact=True).first).to_have_value("10", timeout=90_000)
            expect(page.get_by_text("DDIM 50 steps, eta 0, seed 3")).to_be_visible(timeout=90_000)
            assert "seed=3" in page.url
        finally:
            browser.close()
