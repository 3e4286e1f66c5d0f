import numpy as np
import pandas as pd
import pytest

from dtrak_core.attribution.results import (label_summary, most_neutral, score_table,
                                            scores_to_long_table, top_opponents, top_proponents)


@pytest.fixture
def table():
    metadata = pd.DataFrame({"file_name": [f"{i}.png" for i in range(6)],
                             "artist": ["a", "b", "a", "c", "b", "a"]})
    scores = np.array([0.5, -2.0, 3.0, 0.1, 1.0, -0.05])
    return score_table(scores, metadata, "artist")


def test_score_table_ranks(table):
    assert list(table.columns) == ["train_index", "file_name", "label", "score", "rank"]
    assert table["train_index"].tolist() == [2, 4, 0, 3, 5, 1]
    assert table["rank"].tolist() == [1, 2, 3, 4, 5, 6]
    assert table.loc[table["train_index"] == 1, "file_name"].item() == "1.png"
    assert table.loc[table["train_index"] == 2, "label"].item() == "a"


def test_ties_are_broken_by_index():
    ranks = score_table(np.array([1.0, 2.0, 1.0])).sort_values("train_index")["rank"].tolist()
    assert ranks == [2, 1, 3]


def test_proponents_opponents_neutral(table):
    assert top_proponents(table, 2)["train_index"].tolist() == [2, 4]
    assert top_opponents(table, 2)["train_index"].tolist() == [1, 5]
    assert most_neutral(table, 2)["train_index"].tolist() == [5, 3]
    assert len(top_proponents(table, 100)) == 6
    with pytest.raises(ValueError, match="k=0"):
        top_proponents(table, 0)


def test_label_summary_brute_force(table):
    summary = label_summary(table, top_k=3).set_index("label")
    positive_total = 0.5 + 3.0 + 0.1 + 1.0
    assert summary.loc["a", "positive_share"] == pytest.approx((0.5 + 3.0) / positive_total)
    assert summary.loc["b", "positive_share"] == pytest.approx(1.0 / positive_total)
    assert summary.loc["a", "mean_score"] == pytest.approx((0.5 + 3.0 - 0.05) / 3)
    assert summary.loc["c", "count"] == 1
    assert summary["in_top_k"].to_dict() == {"a": 2, "b": 1, "c": 0}
    assert summary["positive_share"].sum() == pytest.approx(1.0)


def test_long_table_and_errors():
    long = scores_to_long_table(np.array([[1.0, 2.0], [3.0, 0.0]]), target_names=["x", "y"])
    assert len(long) == 4 and set(long["target"]) == {"x", "y"}
    assert long.loc[long["target"] == "y", "train_index"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="2 scores but 3 metadata rows"):
        score_table(np.zeros(2), pd.DataFrame({"file_name": ["a", "b", "c"]}))
    with pytest.raises(ValueError, match="no labels"):
        label_summary(score_table(np.zeros(2)))
