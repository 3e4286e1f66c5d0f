"""Compare methods: one target under several methods, side by side."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from dtrak_app import common as c
from dtrak_app import feature_jobs
from dtrak_app import views
from dtrak_app.text import md_escape, plotly_text
from dtrak_core.attribution.methods import APP_METHODS, METHODS, FeaturesNotReady
from dtrak_core.attribution.results import rank_comparison, top_k_overlap, top_proponents
from dtrak_core.conventions import DEFAULT_LAMBDA

c.require_access()  # first: a page may run without app.py (see require_access)

st.title("Compare methods")
ctx = c.model_context()
if ctx is None:
    st.stop()

target = c.pick_target(ctx)
if "compare" not in st.session_state:
    linked = [m for m in st.query_params.get("compare", "").split(",") if m in APP_METHODS]
    st.session_state["compare"] = linked or ["dtrak", "trak", "pixel"]
chosen = st.multiselect("Methods (two or more)", APP_METHODS, key="compare", format_func=lambda m: METHODS[m].label)
cols = st.columns(3)
cols[0].number_input("K timesteps", min_value=1, max_value=1000, step=1, key="K")
cols[1].selectbox("Projection size k", sorted(set(c.k_OPTIONS) | {int(st.session_state["k"])}), key="k")
top_k = cols[2].number_input("top-k", min_value=1, max_value=100, value=10, step=1)
st.caption("Each kernel method uses its own calibrated lambda for this model, unless you set lambda on "
           "Attribute (Advanced).")
c.sync_url(compare=",".join(chosen))
if target is None:
    st.stop()
if len(chosen) < 2:
    st.warning("Pick at least two methods to compare.")
    st.stop()

K, k = int(st.session_state["K"]), int(st.session_state["k"])
tables, lambdas = {}, {}
for name in chosen:
    pending = feature_jobs.features_pending(ctx, METHODS[name], K, k)
    if pending is not None:  # what it needs and a Start button, or the job's progress (refreshed)
        feature_jobs.wait_for_features(ctx, pending, name, K, k, place=f"{name}_", fallback=None)
        continue
    try:
        lambdas[name] = c.effective_lambda(ctx, name, K, k) if METHODS[name].uses_lambda else None
        # A method without lambda ignores the value (its scores are keyed without it).
        scores = c.scores_for(ctx, target, name, K, k, lambdas[name] if lambdas[name] is not None else DEFAULT_LAMBDA)
    except (FeaturesNotReady, ValueError) as error:
        st.error(f"{METHODS[name].label}: {md_escape(error)}")
        continue
    tables[name] = views.result_table(scores, ctx)

st.image(c.pixel_image_url(target.image, 128), caption=md_escape(target.label))
if not tables:
    st.stop()
columns = st.columns(len(tables))
for column, (name, table) in zip(columns, tables.items()):
    with column:
        st.subheader(METHODS[name].label)
        if lambdas.get(name) is not None:
            st.caption(f"lambda {lambdas[name]:.3g}")
        views.tiles(ctx.train.images, top_proponents(table, 6), columns=2, side=96)

if len(tables) >= 2:
    st.subheader(f"Overlap of the top-{top_k} proponent sets")
    overlap = top_k_overlap(tables, int(top_k))
    labels = [METHODS[n].label for n in overlap.index]
    figure = go.Figure(go.Heatmap(z=overlap.to_numpy(), x=labels, y=labels, zmin=0, zmax=1, colorscale="Blues",
                                  text=overlap.to_numpy(), texttemplate="%{text:.0%}"))
    figure.update_layout(height=360, margin=dict(l=10, r=10, t=10, b=10))
    st.plotly_chart(figure, width="stretch")

    st.subheader("Rank against rank")
    names = list(tables)
    pair = st.columns(2)
    a = pair[0].selectbox("x axis", names, index=0, format_func=lambda m: METHODS[m].label)
    b = pair[1].selectbox("y axis", names, index=1, format_func=lambda m: METHODS[m].label)
    ranks, rho = rank_comparison(tables[a], tables[b])
    scatter = go.Figure(go.Scatter(x=ranks["rank_a"], y=ranks["rank_b"], mode="markers",
                                   text=[plotly_text(v) for v in ranks["label"]], marker=dict(size=5, opacity=0.6)))
    scatter.update_layout(xaxis_title=f"rank under {METHODS[a].label}", yaxis_title=f"rank under {METHODS[b].label}",
                          height=420, margin=dict(l=10, r=10, t=30, b=10),
                          title=f"Spearman rank correlation {rho:.2f}")
    st.plotly_chart(scatter, width="stretch")
