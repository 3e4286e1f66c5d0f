"""Tidy result tables: one row per (target, training image) with score and rank.

``score_table`` builds the per-target table; the helpers pick proponents (highest scores),
opponents (lowest) and neutral images (closest to 0), and aggregate by artist/label.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

COLUMNS = ["train_index", "file_name", "label", "score", "rank"]


def score_table(scores: np.ndarray, metadata: pd.DataFrame | None = None,
                label_column: str | None = None) -> pd.DataFrame:
    """Table for ONE target: scores (n,) against the n training images.

    Columns: train_index, file_name, label (the ``label_column`` value, e.g. the artist, or
    None), score, rank (1 = strongest proponent; ties broken by train_index). Sorted by rank.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores of shape {scores.shape} must be one target's (n,) vector")
    n = len(scores)
    if metadata is not None and len(metadata) != n:
        raise ValueError(f"{n} scores but {len(metadata)} metadata rows; expected one row per training image")
    file_names = (metadata["file_name"].astype(str).to_numpy() if metadata is not None
                  and "file_name" in metadata.columns else np.array([None] * n, dtype=object))
    if label_column is not None and metadata is not None and label_column in metadata.columns:
        labels = metadata[label_column].astype(str).to_numpy()
    else:
        labels = np.array([None] * n, dtype=object)
    order = np.lexsort((np.arange(n), -scores))  # descending score, then index
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    table = pd.DataFrame({"train_index": np.arange(n), "file_name": file_names, "label": labels,
                          "score": scores, "rank": rank})
    return table.iloc[order].reset_index(drop=True)


def scores_to_long_table(scores: np.ndarray, metadata: pd.DataFrame | None = None,
                         label_column: str | None = None,
                         target_names: Sequence[str] | None = None) -> pd.DataFrame:
    """All targets stacked: ``score_table`` per row of scores (m, n) plus target_index/target."""
    frames = []
    for i, row in enumerate(np.atleast_2d(scores)):
        table = score_table(row, metadata, label_column)
        table.insert(0, "target", target_names[i] if target_names is not None else str(i))
        table.insert(0, "target_index", i)
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def _check_k(table: pd.DataFrame, k: int) -> int:
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    return min(k, len(table))


def top_proponents(table: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """The k highest-scoring training images."""
    return table.nlargest(_check_k(table, k), "score", keep="first").reset_index(drop=True)


def top_opponents(table: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """The k lowest-scoring (most negative) training images."""
    return table.nsmallest(_check_k(table, k), "score", keep="first").reset_index(drop=True)


def most_neutral(table: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """The k training images whose scores are closest to zero."""
    k = _check_k(table, k)
    order = np.argsort(np.abs(table["score"].to_numpy()), kind="stable")[:k]
    return table.iloc[order].reset_index(drop=True)


def label_summary(table: pd.DataFrame, top_k: int = 10) -> pd.DataFrame:
    """Per artist/label: positive_share (share of the total positive score), mean_score, count,
    and in_top_k (how many of the top-k proponents carry the label). Sorted by positive_share.
    """
    if table["label"].isna().all():
        raise ValueError("the table has no labels (no artist/label column in the metadata)")
    k = _check_k(table, top_k)
    positive = table["score"].clip(lower=0)
    total = positive.sum()
    top_labels = top_proponents(table, k)["label"]
    grouped = table.assign(positive=positive).groupby("label", sort=True)
    summary = pd.DataFrame({
        "positive_share": grouped["positive"].sum() / total if total > 0 else 0.0,
        "mean_score": grouped["score"].mean(),
        "count": grouped["score"].size(),
    })
    summary["in_top_k"] = top_labels.value_counts().reindex(summary.index, fill_value=0).astype(int)
    return summary.sort_values("positive_share", ascending=False).reset_index()


def top_k_overlap(tables: dict[str, pd.DataFrame], k: int = 10) -> pd.DataFrame:
    """Pairwise overlap of the top-k proponent sets of several methods' tables (same target).

    Returns a square frame (method x method) of |top_k(a) & top_k(b)| / k; the diagonal is 1.
    """
    if not tables:
        raise ValueError("top-k overlap needs at least one score table")
    tops = {name: set(top_proponents(table, k)["train_index"]) for name, table in tables.items()}
    k_eff = {name: len(top) for name, top in tops.items()}
    names = list(tables)
    values = [[len(tops[a] & tops[b]) / max(1, min(k_eff[a], k_eff[b])) for b in names] for a in names]
    return pd.DataFrame(values, index=names, columns=names)


def rank_comparison(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """Rank of every training image under two methods, and their Spearman correlation.

    Returns (frame with train_index, label, rank_a, rank_b; Spearman rho of the ranks).
    """
    if len(a) != len(b):
        raise ValueError(f"the two tables score {len(a)} and {len(b)} training images; expected the same set")
    merged = a[["train_index", "label", "rank"]].merge(b[["train_index", "rank"]], on="train_index",
                                                      suffixes=("_a", "_b")).sort_values("train_index")
    if len(merged) < 2:
        return merged.reset_index(drop=True), float("nan")
    rho = float(np.corrcoef(merged["rank_a"], merged["rank_b"])[0, 1])  # Pearson of ranks = Spearman
    return merged.reset_index(drop=True), rho


def artist_shares(table: pd.DataFrame, top_k: int = 10) -> pd.DataFrame:
    """Each artist's share of the top-k proponents and of the total positive score (for a chart).

    Columns: label, share_of_top_k, share_of_positive_score.
    """
    summary = label_summary(table, top_k)
    k = _check_k(table, top_k)
    return pd.DataFrame({"label": summary["label"], "share_of_top_k": summary["in_top_k"] / k,
                         "share_of_positive_score": summary["positive_share"]})
