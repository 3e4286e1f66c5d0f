"""Attribute: which training images made this image? (the landing page)"""

from __future__ import annotations

import streamlit as st

from dtrak_app import common as c
from dtrak_app import feature_jobs
from dtrak_app import views
from dtrak_app.text import md_escape
from dtrak_core.attribution.methods import METHODS, FeaturesNotReady
from dtrak_core.attribution.results import most_neutral, score_table, top_opponents, top_proponents

c.require_access()  # first: a page may run without app.py (see require_access)

TOP = 10
NEUTRAL = 5

st.title("Which training images made this image?")
ctx = c.model_context()
if ctx is None:
    st.stop()

target = c.pick_target(ctx)
method_name, K, k, lam = c.method_settings()
c.sync_url()
if target is None:
    st.stop()

shown_method = method_name
pending = feature_jobs.features_pending(ctx, METHODS[method_name], K, k)
if pending is not None:  # what they need, a Start button, or the job's progress; pixels meanwhile
    feature_jobs.wait_for_features(ctx, pending, method_name, K, k)
    shown_method = "pixel"

try:
    with st.spinner("Scoring the training images..."):
        scores = c.scores_for(ctx, target, shown_method, K, k, lam)
except FeaturesNotReady as error:  # the features vanished between the check and the scoring
    st.warning(md_escape(error))
    st.stop()
except ValueError as error:
    st.error(md_escape(error))
    st.stop()

label = METHODS[shown_method].label
table = score_table(scores, ctx.train.metadata, ctx.train.label_column)
proponents, opponents = top_proponents(table, TOP), top_opponents(table, TOP)
neutral = most_neutral(table, NEUTRAL)

left, right = st.columns([1, 3])
with left:
    st.subheader("Target")
    st.image(c.pixel_image_url(target.image, 256), caption=md_escape(target.label))
    if target.note:
        st.caption(md_escape(target.note))
    st.caption(f"Method: **{label}** · {METHODS[shown_method].summary}")
with right:
    st.subheader(f"Top {len(proponents)} proponents")
    views.tiles(ctx.train.images, proponents)
st.subheader(f"Top {len(opponents)} opponents")
views.tiles(ctx.train.images, opponents)
st.subheader(f"The {len(neutral)} most neutral")
views.tiles(ctx.train.images, neutral, columns=NEUTRAL)

charts = st.columns(2)
charts[0].plotly_chart(views.score_histogram(
    table, {"proponents": proponents, "opponents": opponents, "neutral": neutral},
    f"All {len(table)} scores ({label})"), width="stretch")
artists = views.artist_chart(table, TOP)
if artists is not None:
    charts[1].plotly_chart(artists, width="stretch")
st.markdown(views.MEANING)

st.subheader("Export")
exports = st.columns(2)
stem = f"{ctx.entry.name}-{target.label.replace(' ', '-')}-{shown_method}"
exports[0].download_button("Score table (CSV)", table.to_csv(index=False).encode(), f"{stem}.csv", "text/csv")
exports[1].download_button("Attribution card (PNG)",
                           views.card_png(target, table, ctx.train.images, label, ctx.entry.name),
                           f"{stem}.png", "image/png")
with st.expander("All scores"):
    st.dataframe(table, hide_index=True, width="stretch")
