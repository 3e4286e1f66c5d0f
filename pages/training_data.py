"""Training data: browse and search the training set; which samples does an image support?"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from dtrak_app import common as c
from dtrak_app.text import md_escape
from dtrak_core.attribution.methods import METHODS

c.require_access()  # first: a page may run without app.py (see require_access)

PAGE = 48

st.title("Training data")
ctx = c.model_context()
if ctx is None:
    st.stop()
meta = ctx.train.metadata
filters = st.columns(3)
mask = pd.Series(True, index=meta.index)
if ctx.train.label_column:
    artists = sorted(meta[ctx.train.label_column].astype(str).unique())
    picked = filters[0].multiselect("Artist", artists, default=artists, key="browse_artist")
    mask &= meta[ctx.train.label_column].astype(str).isin(picked)
if "split" in meta.columns:
    splits = sorted(meta["split"].astype(str).unique())
    picked_splits = filters[1].multiselect("Split", splits, default=splits, key="browse_split")
    mask &= meta["split"].astype(str).isin(picked_splits)
query = filters[2].text_input("Search name or file", key="browse_query").strip().lower()
if query:
    text = meta["file_name"].astype(str).str.lower()
    if "name" in meta.columns:
        text = text + " " + meta["name"].astype(str).str.lower()
    mask &= text.str.contains(query, regex=False)
indices = [int(i) for i in meta.index[mask]]
st.caption(f"{len(indices)} of {len(meta)} training images match.")
if not indices:
    st.stop()

pages = max(1, -(-len(indices) // PAGE))
page = st.number_input("Page", min_value=1, max_value=pages, value=1, step=1) if pages > 1 else 1
shown = indices[(page - 1) * PAGE: page * PAGE]
columns = st.columns(12)
for i, index in enumerate(shown):
    with columns[i % 12]:
        st.image(c.pixel_image_url(ctx.train.images[index], 64), caption=str(index))

def describe(index: int) -> str:
    row = meta.iloc[index]
    name = f" {row['name']}" if "name" in meta.columns else ""
    return f"{index}: {row['file_name']}{name}"

st.subheader("Which generated samples does it support?")
chosen = st.selectbox("Training image", indices, format_func=describe, key="browse_image")
method_name = st.selectbox("Scores of method", list(METHODS), key="browse_method",
                           format_func=lambda m: METHODS[m].label,
                           index=list(METHODS).index(st.session_state.get("method", "dtrak")))
method = METHODS[method_name]
K, k = int(st.session_state["K"]), int(st.session_state["k"])
lam = c.effective_lambda(ctx, method_name, K, k)  # the lambda the Attribute page scores with
left, right = st.columns([1, 3])
with left:
    st.image(c.pixel_image_url(ctx.train.images[chosen], 192), caption=md_escape(describe(chosen)))
    st.dataframe(meta.iloc[[chosen]].T, width="stretch")
with right:
    settings = c.feature_settings(method, K, k) if method.needs_features else None
    store = c.score_cache(ctx, method, settings, lam)
    lookup = store.reverse_lookup(chosen, top=12)
    if lookup.empty:
        st.info(f"No target has been attributed with {method.label} (K={K}, k={k}, lambda={lam:g}) yet; "
                "attribute some on the Attribute page and they appear here.")
    else:
        st.caption(f"Among the {len(store.targets())} targets attributed so far with {method.label}: "
                   "rank 1 = this image is the target's top proponent.")
        columns = st.columns(6)
        for i, row in enumerate(lookup.itertuples(index=False)):
            with columns[i % 6]:
                st.image(c.pixel_image_url(np.asarray(store.image(row.key)), 96),
                         caption=f"{md_escape(row.label)}: rank {row.rank}, score {row.score:+.3g}")
        st.dataframe(lookup, hide_index=True, width="stretch")
c.sync_url()
