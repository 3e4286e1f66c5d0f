"""Pieces of result views shared by pages: image tiles, charts (feature progress: feature_jobs)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dtrak_app import common as c
from dtrak_app.card import CardEntry, render_card
from dtrak_app.text import md_escape, plotly_text
from dtrak_core.attribution.results import artist_shares, top_proponents

MEANING = (
    "**What a score means.** A positive score says the model's behaviour on the target would be "
    "less likely without that training image (a *proponent*); a negative score, more likely (an "
    "*opponent*); near zero, no measurable effect. Scores compare training images *for one target and "
    "one method*: they are not probabilities and not comparable across targets or methods. "
    "**How sure.** These are estimates from one model's gradients. In the D-TRAK paper, D-TRAK's "
    "scores predict retraining outcomes with a rank correlation (LDS) of about 0.11-0.34 on small image "
    "sets (depending on the data and K), TRAK 0.02-0.27, raw pixel similarity about 0.08, random 0: trust the top few more "
    "than the exact order, and check a surprising result with another method (Compare methods)."
)


def tiles(train_images: np.ndarray, table: pd.DataFrame, columns: int = 5, side: int = c.VIEW_PX) -> None:
    """Training images of ``table`` rows in a grid, with rank, score, artist and file under each."""
    if table.empty:
        st.caption("(none)")
        return
    cols = st.columns(columns)
    for i, row in enumerate(table.itertuples(index=False)):
        with cols[i % columns]:
            st.image(c.pixel_image_url(train_images[row.train_index], side), caption=f"#{row.rank}  score {row.score:+.3g}")
            st.caption(f"{md_escape(row.label or '')} · {md_escape(row.file_name)}")


def score_histogram(table: pd.DataFrame, marked: dict[str, pd.DataFrame], title: str) -> go.Figure:
    """Histogram of all scores with the shown images marked as points on the axis."""
    figure = go.Figure(go.Histogram(x=table["score"], nbinsx=60, name="all training images",
                                    marker_color="#9aa5b1"))
    colours = {"proponents": "#1a7f37", "opponents": "#cf222e", "neutral": "#6e7781"}
    for name, rows in marked.items():
        figure.add_trace(go.Scatter(x=rows["score"], y=np.zeros(len(rows)), mode="markers", name=f"shown {name}",
                                    marker=dict(size=10, symbol="triangle-up", color=colours.get(name)),
                                    text=[plotly_text(f) for f in rows["file_name"]],
                                    hovertemplate="%{text}: %{x:.4g}<extra></extra>"))
    figure.update_layout(title=plotly_text(title), xaxis_title="score", yaxis_title="training images", height=320,
                         margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h"))
    return figure


def artist_chart(table: pd.DataFrame, top_k: int) -> go.Figure | None:
    """Each artist's share of the top-k proponents and of the positive score mass."""
    if table["label"].isna().all():
        return None
    shares = artist_shares(table, top_k)
    labels = [plotly_text(label) for label in shares["label"]]
    figure = go.Figure([
        go.Bar(x=labels, y=shares["share_of_top_k"], name=f"share of the top {top_k}"),
        go.Bar(x=labels, y=shares["share_of_positive_score"], name="share of all positive score"),
    ])
    figure.update_layout(barmode="group", yaxis_tickformat=".0%", height=320, title="Artists",
                         margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h"))
    return figure


def card_png(target: c.Target, table: pd.DataFrame, train_images: np.ndarray, method_label: str,
             model_name: str, count: int = 10) -> bytes:
    """The attribution card (dtrak_app.card) as PNG bytes."""
    top = top_proponents(table, count)
    entries = [CardEntry(train_images[r.train_index], int(r.rank), float(r.score), r.label, str(r.file_name))
               for r in top.itertuples(index=False)]
    card = render_card(target.image, entries, f"Top proponents of {target.label}",
                       f"{method_label} on {model_name}; positive = made the target more likely")
    buffer = io.BytesIO()
    card.save(buffer, format="PNG")
    return buffer.getvalue()

