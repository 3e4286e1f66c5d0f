"""Access: beyond loopback the app needs DTRAK_TOKEN, checked before any page draws (AppTest and make).

The browser-level checks (a real server on every interface, a fresh server asked for a page
directly) are in tests/e2e/test_hostile_metadata.py.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess

import pytest
from streamlit.testing.v1 import AppTest

from dtrak_app import common
from tests.app.conftest import APP, FAST, PAGES, REPO, plain

TOKEN = "correct-horse-battery-staple-42"


def run(path: str = APP, **params: str) -> AppTest:
    app = AppTest.from_file(path, default_timeout=90)
    app.query_params.update({**FAST, **params})
    return app.run()


def shows_the_app(app: AppTest) -> bool:
    return any(t.value == "Which training images made this image?" for t in app.title)


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), (None, False), ("", False), ("0.0.0.0", False), ("::", False), ("192.168.1.5", False),
    ("example.org", False), ("localhost.evil.example", False),
])
def test_what_counts_as_loopback(address, loopback):
    assert common.is_loopback(address) is loopback


def test_only_a_browser_served_beyond_loopback_is_refused():
    browser = {"Host": "192.168.1.5:8501"}
    assert common.served_beyond_loopback(browser, "0.0.0.0") and common.served_beyond_loopback(browser, None)
    assert not common.served_beyond_loopback(browser, "127.0.0.1")
    assert not common.served_beyond_loopback({}, "0.0.0.0")  # headless: no request, no listening server


def test_token_comparison():
    assert common.token_matches(TOKEN, TOKEN)
    assert not common.token_matches(TOKEN[:-1], TOKEN) and not common.token_matches("", TOKEN)
    assert not common.token_matches("é" * 20, TOKEN)  # non-ASCII input is compared, not a TypeError


def test_without_a_token_the_app_refuses_to_serve_beyond_loopback(env, monkeypatch):
    monkeypatch.delenv(common.TOKEN_ENV, raising=False)
    assert shows_the_app(run())  # headless (AppTest): no server listens, nothing to refuse
    monkeypatch.setattr(common, "served_beyond_loopback", lambda headers, address: True)
    app = run()
    assert not app.exception and not shows_the_app(app)
    assert not app.get("plotly_chart") and not app.dataframe and len(app.error) == 1
    message = plain(app.error[0].value)
    assert message.startswith("dtrak refuses to serve: it listens on ")
    assert "beyond this computer, and `DTRAK_TOKEN` is not set." in message
    assert "set it to a long random string" in message


def test_with_a_token_each_session_presents_it_once(env, monkeypatch):
    monkeypatch.setenv(common.TOKEN_ENV, TOKEN)
    app = run()
    assert not app.exception and not shows_the_app(app) and not app.error
    assert app.text_input(key="_access_token_input").label == "Access token"
    wrong = run(token="guess")
    assert not shows_the_app(wrong)
    assert plain(wrong.error[0].value) == "That token is not the one this server was started with."
    assert "token" not in wrong.query_params  # never left in the URL, right or wrong
    right = run(token=TOKEN)
    assert not right.exception and shows_the_app(right) and "token" not in right.query_params
    right.run()  # the session keeps the grant
    assert shows_the_app(right)
    typed = run()
    typed.text_input(key="_access_token_input").input(TOKEN)
    typed.form_submit_button[0].click().run()
    assert shows_the_app(typed)


def test_a_short_token_is_refused(env, monkeypatch):
    monkeypatch.setenv(common.TOKEN_ENV, "short")
    app = run(token="short")
    assert not shows_the_app(app)
    assert plain(app.error[0].value).startswith("`DTRAK_TOKEN` is 5 characters long; at least 16 are required")


@pytest.mark.parametrize("page", sorted(p.name for p in PAGES.glob("*.py")))
def test_every_page_checks_access_first(page, env, monkeypatch):
    # Streamlit may run a file of pages/ without app.py (its pages-folder mode, on a fresh server).
    tree = ast.parse((PAGES / page).read_text())
    body = [node for node in tree.body if not isinstance(node, (ast.Import, ast.ImportFrom))
            and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert ast.unparse(body[0]) == "c.require_access()", page
    monkeypatch.setenv(common.TOKEN_ENV, TOKEN)
    app = run(str(PAGES / page))
    assert not app.exception
    assert [t.value for t in app.title] == ["dtrak"] and len(app.text_input) == 1  # the sign-in form only


def make(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    process = subprocess.Popen(["make", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # it started the app: stop it and everything it started
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError("make started the app instead of refusing")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_make_run_refuses_every_interface_without_a_token():
    bare = {k: v for k, v in os.environ.items() if k != common.TOKEN_ENV and not k.startswith("MAKE")}
    refused = make("run", "HOST=0.0.0.0", env=bare)
    assert refused.returncode == 2 and refused.stdout == ""  # nothing installed, built or started
    assert refused.stderr.startswith("error: HOST=0.0.0.0 would let anyone who reaches this machine browse the "
                                     "training images, register models and start jobs; set DTRAK_TOKEN")
    assert make("check-host", "HOST=127.0.0.1", env=bare).returncode == 0
    assert make("check-host", "HOST=0.0.0.0", env={**bare, common.TOKEN_ENV: TOKEN}).returncode == 0
