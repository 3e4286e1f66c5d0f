"""Comparisons of score tables the app shows: top-k overlap, rank against rank, artist shares."""

import numpy as np
import pandas as pd
import pytest

from dtrak_core.attribution.results import artist_shares, rank_comparison, score_table, top_k_overlap


def test_overlap_rank_comparison_and_artist_shares():
    meta = pd.DataFrame({"file_name": [f"{i}.png" for i in range(4)], "artist": ["a", "a", "b", "b"]})
    t1 = score_table(np.array([4.0, 3.0, 2.0, 1.0]), meta, "artist")
    t2 = score_table(np.array([1.0, 2.0, 3.0, 4.0]), meta, "artist")
    overlap = top_k_overlap({"x": t1, "y": t2}, k=2)
    assert overlap.loc["x", "x"] == 1.0 and overlap.loc["x", "y"] == 0.0
    assert top_k_overlap({"x": t1, "y": t2}, k=3).loc["x", "y"] == pytest.approx(2 / 3)
    ranks, rho = rank_comparison(t1, t2)
    assert rho == pytest.approx(-1.0) and ranks["rank_a"].tolist() == [1, 2, 3, 4]
    shares = artist_shares(t1, 2).set_index("label")
    assert shares.loc["a", "share_of_top_k"] == 1.0 and shares.loc["a", "share_of_positive_score"] == pytest.approx(0.7)
