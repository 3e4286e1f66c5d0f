import numpy as np
import pandas as pd
import pytest

from dtrak_core.attribution.results import (artist_shares, empty_list_reason, label_summary, most_neutral,
                                            relative_strength, score_table, scores_to_long_table, sign_of_scores,
                                            top_opponents, top_proponents)


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
    assert len(top_proponents(table, 100)) == 4  # the four positive scores; -0.05 and -2 are opponents
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


def brute_lists(scores, k):
    """The lists by their definitions, by brute force: proponents > 0 (highest first), opponents < 0
    (lowest first), neutral closest to 0 only when 0 lies within the scores' range."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    pro = [i for i in order if scores[i] > 0][:k]
    opp = [i for i in sorted(range(len(scores)), key=lambda i: (scores[i], i)) if scores[i] < 0][:k]
    straddles = min(scores) <= 0 <= max(scores) and any(s != 0 for s in scores)
    neutral = sorted(range(len(scores)), key=lambda i: (abs(scores[i]), order.index(i)))[:k] if straddles else []
    return pro, opp, neutral


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shift", ["mixed", "positive", "negative"])
def test_lists_match_their_definitions(seed, shift):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=15)
    if shift == "positive":
        scores = np.abs(scores) + 0.01
    elif shift == "negative":
        scores = -np.abs(scores) - 0.01
    table = score_table(scores)
    pro, opp, neutral = brute_lists(scores.tolist(), 4)
    assert top_proponents(table, 4)["train_index"].tolist() == pro
    assert top_opponents(table, 4)["train_index"].tolist() == opp
    assert most_neutral(table, 4)["train_index"].tolist() == neutral


def test_all_positive_scores_have_no_opponents_and_no_neutral_and_say_why():
    # Raw pixel cosine is never negative: the lists used to show the weakest proponents as
    # "opponents" and the same five again as "the most neutral".
    table = score_table(np.array([0.9, 0.5, 0.7, 0.2, 0.4]))
    assert sign_of_scores(table) == "positive"
    assert top_proponents(table, 3)["train_index"].tolist() == [0, 2, 1]
    assert top_opponents(table, 3).empty and most_neutral(table, 3).empty
    assert empty_list_reason(table, "proponents") is None
    assert empty_list_reason(table, "opponents") == ("no training image lowers this image's likelihood under "
                                                     "this method (none of the 5 scores is below 0)")
    assert empty_list_reason(table, "neutral") == ("all 5 scores are positive, so none lies between proponents "
                                                   "and opponents: the smallest are the weakest proponents, not "
                                                   "images without effect")


def test_all_negative_scores_have_no_proponents_and_say_why():
    table = score_table(np.array([-0.9, -0.5, -0.7]))
    assert sign_of_scores(table) == "negative"
    assert top_proponents(table, 2).empty and most_neutral(table, 2).empty
    assert top_opponents(table, 2)["train_index"].tolist() == [0, 2]
    assert empty_list_reason(table, "proponents") == ("no training image raises this image's likelihood under "
                                                      "this method (none of the 3 scores is above 0)")
    assert empty_list_reason(table, "opponents") is None
    assert "the smallest are the weakest opponents" in empty_list_reason(table, "neutral")


def test_all_zero_and_mixed_signs():
    zero = score_table(np.zeros(3))
    assert top_proponents(zero, 2).empty and top_opponents(zero, 2).empty and most_neutral(zero, 2).empty
    assert empty_list_reason(zero, "neutral") == ("all 3 scores are 0: no training image has a measurable effect "
                                                  "under this method")
    mixed = score_table(np.array([0.0, 0.3, 0.6]))  # a zero score is neutral, but nothing is an opponent
    assert most_neutral(mixed, 1)["train_index"].tolist() == [0]
    assert empty_list_reason(mixed, "neutral") is None and "below 0" in empty_list_reason(mixed, "opponents")
    with pytest.raises(ValueError, match="list 'others' is not one of proponents, opponents, neutral"):
        empty_list_reason(mixed, "others")


def test_relative_strength_is_a_share_of_the_largest_magnitude():
    strength = relative_strength(np.array([2.0, -1.0, 0.5, -4.0]))
    assert strength.tolist() == [0.5, -0.25, 0.125, -1.0]
    assert relative_strength(np.zeros(2)).tolist() == [0.0, 0.0]


def test_names_column_and_artist_shares_against_the_training_data():
    metadata = pd.DataFrame({"file_name": ["a/1.png", "a/2.png", "b/1.png", "b/2.png", "b/3.png"],
                             "artist": ["a", "a", "b", "b", "b"], "name": ["cat", "dog", "cat", "dog", "owl"]})
    table = score_table(np.array([3.0, 1.0, 0.5, 0.5, -1.0]), metadata, "artist", "name")
    assert list(table.columns) == ["train_index", "file_name", "name", "label", "score", "rank"]
    assert table["name"].tolist() == ["cat", "dog", "cat", "dog", "owl"]
    assert "name" not in score_table(np.zeros(5), metadata, "artist").columns
    assert score_table(np.zeros(5), metadata[["file_name"]], None, "name")["name"].isna().all()
    shares = artist_shares(table, top_k=3).set_index("label")
    # Brute force: positive mass 5.0, a holds 4.0 of it with 2 of 5 images; the top 3 are a, a, b.
    assert shares.loc["a", "share_of_positive_score"] == pytest.approx(0.8)
    assert shares.loc["a", "share_of_training_data"] == pytest.approx(0.4)
    assert shares.loc["a", "ratio_to_training_data"] == pytest.approx(2.0)
    assert shares.loc["b", "ratio_to_training_data"] == pytest.approx(0.2 / 0.6)
    assert shares.loc["a", "share_of_top_k"] == pytest.approx(2 / 3)
    # Only two positive scores: the share of the top-k is of the proponents shown (2), not of k.
    two = artist_shares(score_table(np.array([1.0, 1.0, -1.0, -1.0, -1.0]), metadata, "artist"), 4)
    assert two.set_index("label").loc["a", "share_of_top_k"] == 1.0
