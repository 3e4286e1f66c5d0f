"""dtrak: which training images made this generated image? (Streamlit entry point.)

Run with ``make run`` (listens on 127.0.0.1). The pages live in ``pages/``; shared widgets and
caching in ``dtrak_app/``; every computation in ``dtrak_core``. Served beyond loopback, the app
requires the secret ``DTRAK_TOKEN`` (``dtrak_app.common.require_access``, checked before any page).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dtrak_app.common import keep_shared_state, require_access

HERE = Path(__file__).resolve().parent

st.set_page_config(page_title="dtrak", page_icon=":mag:", layout="wide")
require_access()  # stops the run (showing why, or a token form) unless this session may see the app

PAGES = [
    st.Page("pages/attribute.py", title="Attribute", icon=":material/image_search:", default=True),
    st.Page("pages/compare.py", title="Compare methods", icon=":material/compare:"),
    st.Page("pages/training_data.py", title="Training data", icon=":material/photo_library:"),
]
# The evaluation pages (LDS benchmark, counterfactual retraining) when present.
for file, title, icon in (("benchmark.py", "Benchmark", ":material/leaderboard:"),
                          ("counterfactual.py", "Counterfactual", ":material/science:")):
    if (HERE / "pages" / file).exists():
        PAGES.append(st.Page(f"pages/{file}", title=title, icon=icon))
PAGES += [
    st.Page("pages/jobs.py", title="Jobs", icon=":material/pending_actions:"),
    st.Page("pages/about.py", title="About", icon=":material/info:"),
]
keep_shared_state()  # before any page draws (or skips) the widgets that hold the shared settings
st.navigation(PAGES).run()
