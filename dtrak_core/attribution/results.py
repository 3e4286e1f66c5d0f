"""Tidy result tables: one row per (target, training image) with score and rank.

``score_table`` builds the per-target table; the helpers pick proponents (the highest positive
scores), opponents (the lowest negative scores) and neutral images (closest to 0, when the scores
take both signs), and aggregate by artist/label.

Signs matter: a proponent is a training image whose score is above 0 (it made the target more
likely), an opponent one below 0. When every score shares a sign (raw pixel cosine is never
negative) a list may be empty; :func:`empty_list_reason` says why, rather than filling the
opponents with the weakest proponents (and the neutral list with the same images again).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

COLUMNS = ["train_index", "file_name", "label", "score", "rank"]


def score_table(scores: np.ndarray, metadata: pd.DataFrame | None = None,
                label_column: str | None = None, name_column: str | None = None) -> pd.DataFrame:
    """Table for ONE target: scores (n,) against the n training images.

    Columns: train_index, file_name, label (the ``label_column`` value, e.g. the artist, or
    None), score, rank (1 = strongest proponent; ties broken by train_index). Sorted by rank.
    With ``name_column`` (e.g. emoji3's "name"), a ``name`` column after file_name: that metadata
    value, or None where the metadata has no such column.
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
    if name_column is not None:
        names = (metadata[name_column].astype(str).to_numpy() if metadata is not None
                 and name_column in metadata.columns else np.array([None] * n, dtype=object))
        table.insert(2, "name", names)
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
    """Up to k training images with the highest scores above 0 (fewer when fewer are positive)."""
    k = _check_k(table, k)
    return table[table["score"] > 0].nlargest(k, "score", keep="first").reset_index(drop=True)


def top_opponents(table: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """Up to k training images with the lowest scores below 0, most negative first (fewer, or
    none, when fewer are negative: the weakest proponent is not an opponent)."""
    k = _check_k(table, k)
    return table[table["score"] < 0].nsmallest(k, "score", keep="first").reset_index(drop=True)


def scores_take_both_signs(table: pd.DataFrame) -> bool:
    """Whether 0 lies within the scores' range (min <= 0 <= max, not all exactly 0): only then is
    "close to zero" a place between proponents and opponents."""
    scores = table["score"].to_numpy()
    return len(scores) > 0 and scores.min() <= 0 <= scores.max() and bool(np.any(scores != 0))


def most_neutral(table: pd.DataFrame, k: int = 10) -> pd.DataFrame:
    """The k training images whose scores are closest to zero (ties: table order), when the
    scores take both signs; empty otherwise: when every score is positive, the smallest are the
    weakest proponents, not images without effect (see :func:`empty_list_reason`)."""
    k = _check_k(table, k)
    if not scores_take_both_signs(table):
        return table.iloc[:0].reset_index(drop=True)
    order = np.argsort(np.abs(table["score"].to_numpy()), kind="stable")[:k]
    return table.iloc[order].reset_index(drop=True)


def sign_of_scores(table: pd.DataFrame) -> str:
    """"positive" (every score > 0), "negative" (every score < 0), "zero" (every score 0), or
    "mixed"; what decides which lists can be filled."""
    scores = table["score"].to_numpy()
    if len(scores) and np.all(scores > 0):
        return "positive"
    if len(scores) and np.all(scores < 0):
        return "negative"
    if len(scores) and np.all(scores == 0):
        return "zero"
    return "mixed"


def empty_list_reason(table: pd.DataFrame, which: str) -> str | None:
    """Why the list ``which`` ("proponents", "opponents" or "neutral") of ``table`` is empty, in
    one plain sentence; None when it is not empty.

    The wording speaks of likelihood: a positive score says the training image made the target
    more likely (reference section 2), a negative one less likely.
    """
    lists = {"proponents": top_proponents, "opponents": top_opponents, "neutral": most_neutral}
    if which not in lists:
        raise ValueError(f"list {which!r} is not one of {', '.join(lists)}")
    if len(table) == 0:
        return "there are no training images"
    if len(lists[which](table, 1)):
        return None
    sign, n = sign_of_scores(table), len(table)
    if which == "proponents":
        return f"no training image raises this image's likelihood under this method (none of the {n} scores is above 0)"
    if which == "opponents":
        return f"no training image lowers this image's likelihood under this method (none of the {n} scores is below 0)"
    if sign == "zero":
        return f"all {n} scores are 0: no training image has a measurable effect under this method"
    return (f"all {n} scores are {sign}, so none lies between proponents and opponents: the smallest are "
            f"the weakest {'proponents' if sign == 'positive' else 'opponents'}, not images without effect")


def relative_strength(scores: pd.Series | np.ndarray) -> np.ndarray:
    """Each score as a share of the largest score magnitude: score / max_j |score_j|, in [-1, 1]
    (the strongest proponent is 1 when it outweighs every opponent); zeros when all are 0.

    What a reader can compare at a glance ("62% of the top score"); the raw score stays in the
    table, since its unit depends on the model, the method and lambda.
    """
    scores = np.asarray(scores, dtype=np.float64)
    top = np.abs(scores).max() if len(scores) else 0.0
    return scores / top if top > 0 else np.zeros_like(scores)


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
    """Each artist's share of the top-k proponents, of the total positive score and of the
    training data (the baseline: an artist with a third of the images "should" get a third).

    Columns: label, share_of_top_k (of the proponents shown: fewer than k when fewer scores are
    positive; 0 when none is), share_of_positive_score, share_of_training_data, and
    ratio_to_training_data = share_of_positive_score / share_of_training_data (1 = as much as
    its share of the images; "contributed 1.6x their share").
    """
    summary = label_summary(table, top_k)
    shown = len(top_proponents(table, top_k))
    data_share = summary["count"] / summary["count"].sum()
    return pd.DataFrame({"label": summary["label"],
                         "share_of_top_k": summary["in_top_k"] / shown if shown else 0.0,
                         "share_of_positive_score": summary["positive_share"],
                         "share_of_training_data": data_share,
                         "ratio_to_training_data": summary["positive_share"] / data_share})
