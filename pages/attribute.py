"""Attribute: which training images made this image? (the landing page)

Written for someone who has never heard of attribution: the target, the training images that
made it most likely (named, with their relative strength), each artist's share beside their
share of the data, three sentences on what it means and how sure it is. The method and its
settings sit in the "Advanced" panel; lambda defaults to the model's calibration.
"""

from __future__ import annotations

import streamlit as st

from dtrak_app import common as c
from dtrak_app import feature_jobs
from dtrak_app import views
from dtrak_app.text import md_escape
from dtrak_core.attribution.methods import METHODS, FeaturesNotReady
from dtrak_core.attribution.results import empty_list_reason, most_neutral, top_opponents, top_proponents

c.require_access()  # first: a page may run without app.py (see require_access)

TOP = 10
NEUTRAL = 5

st.title("Which training images made this image?")
ctx = c.model_context()
if ctx is None:
    st.stop()

target = c.pick_target(ctx)
settings = c.method_settings(ctx)
method_name, K, k, lam = settings.method, settings.K, settings.k, settings.lam
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

spec = METHODS[shown_method]
label = spec.label
table = views.result_table(scores, ctx)
proponents, opponents = top_proponents(table, TOP), top_opponents(table, TOP)
neutral = most_neutral(table, NEUTRAL)
label_name = ctx.train.label_column or "label"

if shown_method == "random":
    st.warning("**Random scores: a sanity check, not a result.** They show what chance looks like; any real "
               "method must do clearly better. Pick D-TRAK under Advanced for the real attribution.")
elif shown_method == "pixel" and method_name == "pixel":
    st.info("**Raw pixel similarity: a baseline.** It ranks training images by how alike their pixels look, "
            "knowing nothing of the model.")

settings_line = f"Method: **{md_escape(label)}**"
if spec.uses_lambda:
    settings_line += f" · lambda {lam:.3g} ({md_escape(settings.record(shown_method)['lambda_source'])})"
left, right = st.columns([1, 3])
with left:
    st.subheader("Target")
    st.image(c.pixel_image_url(target.image, 256), caption=md_escape(target.label))
    if target.note:
        st.caption(md_escape(target.note))
    st.caption(f"{settings_line} · {md_escape(spec.summary)}")
with right:
    st.subheader("The training images that made this image most likely")
    st.caption("Strength: each image's score as a share of the strongest score. Hover a name's (?) for its file "
               "and raw score.")
    views.tiles(ctx.train.images, proponents, empty=empty_list_reason(table, "proponents") or "")

charts = st.columns(2)
with charts[0]:
    sentence = views.artist_sentence(table, TOP, label_name)
    if sentence is not None:
        st.markdown(f"**{md_escape(sentence)}**")
    artists = views.artist_chart(table, TOP, label_name)
    if artists is not None:
        st.plotly_chart(artists, width="stretch")
    else:
        st.caption("The training images have no artist or label column, so there is no breakdown by artist.")
charts[1].plotly_chart(views.score_histogram(
    table, {"proponents": proponents, "opponents": opponents, "neutral": neutral},
    f"All {len(table)} training images ({label})"), width="stretch")
st.markdown(views.MEANING)
st.markdown(views.how_sure(c.measured_lds(ctx, shown_method, K), label, shown_method,
                           lam if spec.uses_lambda else None))

st.subheader("Training images that made it less likely (opponents)")
views.tiles(ctx.train.images, opponents, empty=empty_list_reason(table, "opponents") or "")
st.subheader("No measurable effect (the most neutral)")
views.tiles(ctx.train.images, neutral, columns=NEUTRAL, empty=empty_list_reason(table, "neutral") or "")

st.subheader("Export")
info = views.ExportInfo.now(target.label, ctx.entry.name, settings.record(shown_method))
exports = st.columns(2)
stem = f"{ctx.entry.name}-{target.label.replace(' ', '-')}-{shown_method}"
exports[0].download_button("Score table (CSV)", views.export_table(table, info).to_csv(index=False).encode(),
                           f"{stem}.csv", "text/csv")
if proponents.empty:
    exports[1].caption("No attribution card: no training image has a positive score.")
else:
    exports[1].download_button("Attribution card (PNG)", views.card_png(target, table, ctx.train.images, info),
                               f"{stem}.png", "image/png")
with st.expander("All scores (raw)"):
    st.dataframe(table, hide_index=True, width="stretch")
