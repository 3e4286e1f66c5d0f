"""Every page after every other page (all ordered pairs), headless with AppTest's switch_page.

The walk is an Eulerian circuit of the complete directed graph of the pages: n(n-1) moves, each
ordered pair exactly once, starting and ending on the landing page. The browser test
(tests/e2e/test_navigation.py) walks the same circuit in Chromium, where Streamlit deletes the
state of widgets a page did not draw (AppTest does not show that failure).
"""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from tests.app.conftest import APP, FAST, PAGES

#: The app's pages in navigation order (app.py), by file; the first is the landing page.
PAGE_FILES = ("attribute.py", "compare.py", "training_data.py", "benchmark.py", "counterfactual.py", "jobs.py",
              "about.py")


def app_pages() -> list[str]:
    """The pages app.py registers (the evaluation pages only when their files exist)."""
    return [name for name in PAGE_FILES if (PAGES / name).exists()]


def all_pairs_walk(nodes: list[str]) -> list[str]:
    """A closed walk over ``nodes`` that moves along every ordered pair (a, b), a != b, exactly
    once (Hierholzer's algorithm on the complete digraph: every node has in-degree = out-degree)."""
    unused = {a: [b for b in reversed(nodes) if b != a] for a in nodes}
    stack, walk = [nodes[0]], []
    while stack:
        here = stack[-1]
        if unused[here]:
            stack.append(unused[here].pop())
        else:
            walk.append(stack.pop())
    return walk[::-1]


def test_the_walk_covers_every_ordered_pair_once():
    nodes = ["a", "b", "c", "d"]
    walk = all_pairs_walk(nodes)
    moves = list(zip(walk, walk[1:]))
    assert walk[0] == walk[-1] == "a"
    assert sorted(moves) == sorted((a, b) for a in nodes for b in nodes if a != b)


def test_every_page_after_every_other_page(env):
    app = AppTest.from_file(APP, default_timeout=120)
    app.query_params.update(FAST)
    app.run()
    assert not app.exception
    # Change the shared settings first, as a user would, then walk.
    app.number_input(key="lambda").set_value(10.0).run()
    app.button(key="pick_2").click().run()
    assert not app.exception
    pages = app_pages()
    walk = all_pairs_walk(pages)
    assert len(walk) == len(pages) * (len(pages) - 1) + 1
    failures = []
    for page in walk[1:]:
        app.switch_page(str(Path("pages") / page)).run()
        if app.exception:
            failures.append((page, app.exception[0].value))
    assert not failures, failures
    assert app.session_state["lambda"] == 10.0 and app.session_state["seed"] == 2  # kept all the way
