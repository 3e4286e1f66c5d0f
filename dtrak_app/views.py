"""Pieces of result views shared by pages: image tiles, charts, the export (feature progress: feature_jobs).

Words for people who have never heard of attribution: a training image is named by its
metadata ``name`` (the emoji's name; the file name on hover and in the CSV), a score is shown as
its relative strength (a share of the strongest score; the raw score in the table and CSV), and
each artist's share is drawn beside their share of the training data.
"""

from __future__ import annotations

import datetime as _dt
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dtrak_app import common as c
from dtrak_app.card import CardEntry, render_card
from dtrak_app.text import md_escape, plotly_text
from dtrak_core.attribution.results import artist_shares, relative_strength, score_table, top_proponents

#: The metadata column that names a training image (emoji3: the emoji's name).
NAME_COLUMN = "name"

#: What a score means, in three short sentences (the "how sure" line follows: :func:`how_sure`).
MEANING = (
    "**What the scores mean.** A *proponent* is a training image that made this image more likely: "
    "without it, the model would be less inclined to draw it. An *opponent* pushed the other way, and a "
    "score near zero means no measurable effect. Scores rank the training images for this one image and "
    "method: they are not probabilities, and not comparable across images or methods."
)


def result_table(scores: np.ndarray, ctx: c.Context) -> pd.DataFrame:
    """One target's score table (``results.score_table`` with the ``name`` column) plus
    ``relative_strength``: score / max |score| (the strongest effect is +-100%)."""
    table = score_table(scores, ctx.train.metadata, ctx.train.label_column, NAME_COLUMN)
    table["relative_strength"] = relative_strength(table["score"])
    return table


def display_name(row) -> str:
    """How a training image is called: its metadata name, else its file name (plain text)."""
    name = getattr(row, "name", None)
    return str(name) if isinstance(name, str) and name and name != "nan" else str(row.file_name)


def strength_text(value: float) -> str:
    """A relative strength as a percentage people read: "62%", "-8%", "<1%" for tiny non-zero ones."""
    if value != 0 and abs(value) < 0.005:
        return "<1%" if value > 0 else "-<1%"
    return f"{value:.0%}"


def tiles(train_images: np.ndarray, table: pd.DataFrame, columns: int = 5, side: int = c.VIEW_PX,
          empty: str = "(none)") -> None:
    """Training images of ``table`` rows in a grid: each named (its file, artist, raw score and rank on
    hover), with its relative strength. ``empty``: what to say when there are none."""
    if table.empty:
        st.caption(md_escape(empty))
        return
    cols = st.columns(columns)
    has_strength = "relative_strength" in table.columns
    for i, row in enumerate(table.itertuples(index=False)):
        with cols[i % columns]:
            st.image(c.pixel_image_url(train_images[row.train_index], side))
            details = f"file {row.file_name}" + (f", by {row.label}" if row.label else "") + \
                f"; raw score {row.score:+.4g}, rank {row.rank}"
            st.caption(f"**{md_escape(display_name(row))}**", help=md_escape(details))
            strength = f"strength {strength_text(row.relative_strength)}" if has_strength else f"score {row.score:+.3g}"
            st.caption(f"#{row.rank} · {strength}" + (f" · {md_escape(row.label)}" if row.label else ""))


def score_histogram(table: pd.DataFrame, marked: dict[str, pd.DataFrame], title: str) -> go.Figure:
    """Histogram of every training image's relative strength, with the shown images marked on the axis.

    The legend sits above the plot (below it, it covered the axis title).
    """
    figure = go.Figure(go.Histogram(x=table["relative_strength"], nbinsx=60, name="all training images",
                                    marker_color="#9aa5b1", hovertemplate="%{x:.0%}: %{y} images<extra></extra>"))
    colours = {"proponents": "#1a7f37", "opponents": "#cf222e", "neutral": "#6e7781"}
    for name, rows in marked.items():
        if rows.empty:
            continue
        figure.add_trace(go.Scatter(x=rows["relative_strength"], y=np.zeros(len(rows)), mode="markers",
                                    name=f"shown {name}",
                                    marker=dict(size=10, symbol="triangle-up", color=colours.get(name)),
                                    text=[plotly_text(display_name(r)) for r in rows.itertuples(index=False)],
                                    customdata=rows["score"],
                                    hovertemplate="%{text}: %{x:.0%} (raw %{customdata:.4g})<extra></extra>"))
    figure.update_layout(title=dict(text=plotly_text(title), y=0.98, yanchor="top"),
                         xaxis=dict(title="strength (share of the strongest score)", tickformat=".0%"),
                         yaxis_title="training images", height=340, margin=dict(l=10, r=10, t=80, b=10),
                         legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0))
    return figure


def artist_chart(table: pd.DataFrame, top_k: int, label_name: str = "artist") -> go.Figure | None:
    """Each artist's share of the top-k proponents and of the positive score, beside (as a baseline
    marker) their share of the training data; None without labels."""
    if table["label"].isna().all():
        return None
    shares = artist_shares(table, top_k)
    labels = [plotly_text(label) for label in shares["label"]]
    shown = min(top_k, int((table["score"] > 0).sum()))
    figure = go.Figure([
        go.Bar(x=labels, y=shares["share_of_top_k"], name=f"share of the top {shown}"),
        go.Bar(x=labels, y=shares["share_of_positive_score"], name="share of all positive score"),
        go.Scatter(x=labels, y=shares["share_of_training_data"], mode="markers", name="share of the training data",
                   marker=dict(symbol="line-ew-open", size=44, color="#24292f", line=dict(width=3)),
                   hovertemplate="%{x}: %{y:.0%} of the training images<extra></extra>"),
    ])
    figure.update_layout(barmode="group", yaxis_tickformat=".0%", height=340,
                         title=dict(text=plotly_text(f"By {label_name}, against their share of the data"),
                                    y=0.98, yanchor="top"),
                         margin=dict(l=10, r=10, t=80, b=10),
                         legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0))
    return figure


def artist_sentence(table: pd.DataFrame, top_k: int, label_name: str = "artist") -> str | None:
    """One sentence on the artist whose share of the positive score is furthest above their share of
    the training data ("openmoji's images contributed 1.6x their share: ..."; the chart compares
    them all); plain text; None without labels or positive scores."""
    if table["label"].isna().all() or not (table["score"] > 0).any():
        return None
    shares = artist_shares(table, top_k).sort_values("ratio_to_training_data", ascending=False, kind="stable")
    top = shares.iloc[0]
    ratio = float(top["ratio_to_training_data"])
    return (f"{top['label']}'s images contributed {ratio:.1f}x their share: {top['share_of_positive_score']:.0%} "
            f"of the positive score, from {top['share_of_training_data']:.0%} of the training images.")


def how_sure(measured: c.MeasuredLds | None, method_label: str, method_name: str, lam: float | None = None) -> str:
    """The "how sure is this" line (Markdown): the measured LDS of this model when there is one
    (``lam``: the lambda in use, said when it is not the one the LDS was measured at)."""
    if method_name == "random":
        return ("**How sure is this?** Not at all, by design: random scores are a sanity check; a real method "
                "should do clearly better (see Benchmark).")
    if measured is None:
        return (f"**How sure is this?** Not measured for this model: no LDS build of it scores "
                f"{md_escape(method_label)} at these settings (the Benchmark page shows the small evaluation "
                "model's). Trust the top few more than the exact order.")
    targets = "held-out real images" if measured.kind == "validation" else "generated images"
    at = f", lambda {measured.lam:.3g}" if measured.lam is not None else ""
    other = (f" It was measured at lambda {measured.lam:.3g}, not at the {lam:.3g} in use here."
             if measured.lam is not None and lam is not None and f"{lam:.3g}" != f"{measured.lam:.3g}" else "")
    return (f"**How sure is this?** Measured on this model: when it is retrained on random halves of its data, "
            f"{md_escape(measured.label)}{md_escape(at)} predicts the outcome with a rank correlation (LDS) of "
            f"{measured.mean:.2f} (95% CI {measured.ci_low:.2f} to {measured.ci_high:.2f}) on "
            f"{measured.num_targets} {targets}; 1 would be perfect, random scores get 0 "
            f"(LDS build {md_escape(measured.build)}).{md_escape(other)}")


@dataclass(frozen=True)
class ExportInfo:
    """What an export says besides the scores: the target, model, method settings and the date."""

    target: str
    model: str
    settings: dict  # c.Settings.record(): method, K, k, lambda, lambda_source
    date: str

    @classmethod
    def now(cls, target: str, model: str, settings: dict) -> "ExportInfo":
        return cls(target, model, settings, _dt.datetime.now(_dt.timezone.utc).date().isoformat())

    def line(self) -> str:
        """The settings in one line, for the card (plain text)."""
        parts = [f"{self.settings['method']} on {self.model}"]
        if self.settings.get("K") is not None:
            parts.append(f"K={self.settings['K']}, k={self.settings['k']}")
        if self.settings.get("lambda") is not None:
            parts.append(f"lambda {self.settings['lambda']:.3g} ({self.settings['lambda_source']})")
        return "; ".join(parts) + f"; {self.date}"


EXPORT_COLUMNS = ["target", "model", "method", "K", "k", "lambda", "lambda_source", "date", "rank", "name",
                  "file_name", "label", "score", "relative_strength", "train_index"]


def export_table(table: pd.DataFrame, info: ExportInfo) -> pd.DataFrame:
    """The CSV: one row per training image (by rank) with what produced it (target, model, method,
    K, k, lambda and its source, date) in every row, so any row read alone says where it came from."""
    out = table.copy()
    for name, value in (("target", info.target), ("model", info.model), ("method", info.settings["method"]),
                        ("K", info.settings.get("K")), ("k", info.settings.get("k")),
                        ("lambda", info.settings.get("lambda")), ("lambda_source", info.settings.get("lambda_source")),
                        ("date", info.date)):
        out[name] = value
    if "name" not in out.columns:
        out["name"] = None
    return out[EXPORT_COLUMNS]


def card_png(target: c.Target, table: pd.DataFrame, train_images: np.ndarray, info: ExportInfo,
             count: int = 10) -> bytes:
    """The attribution card (dtrak_app.card) as PNG bytes: the target's top proponents, named, with the
    model, method, K, k, lambda (and its source) and the date."""
    top = top_proponents(table, count)
    entries = [CardEntry(train_images[r.train_index], int(r.rank), float(r.score), r.label, str(r.file_name),
                         display_name(r), float(r.relative_strength) if "relative_strength" in table.columns else None)
               for r in top.itertuples(index=False)]
    card = render_card(target.image, entries, f"Training images that made {target.label} most likely",
                       info.line())
    buffer = io.BytesIO()
    card.save(buffer, format="PNG")
    return buffer.getvalue()

