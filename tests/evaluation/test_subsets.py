"""Subset sampling: stratified, reproducible, extendable, tuning separate from reported."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dtrak_core.evaluation.subsets import SubsetPlan, draw_subsets, make_plan, stratified_subset


LABELS = ["twemoji"] * 30 + ["openmoji"] * 21 + ["noto"] * 9


def test_every_subset_holds_half_of_every_artist():
    for subset in draw_subsets(LABELS, 10, alpha=0.5, seed=3):
        counts = Counter(LABELS[i] for i in subset.indices)
        assert counts == {"twemoji": 15, "openmoji": round(0.5 * 21), "noto": round(0.5 * 9)}
        assert list(subset.indices) == sorted(set(subset.indices))


def test_subsets_are_reproducible_and_extending_keeps_earlier_ones():
    a = draw_subsets(LABELS, 4, seed=7)
    assert a == draw_subsets(LABELS, 4, seed=7)
    assert draw_subsets(LABELS, 6, seed=7)[:4] == a
    assert draw_subsets(LABELS, 4, seed=8) != a
    assert len({s.indices for s in draw_subsets(LABELS, 20, seed=7)}) == 20


def test_tuning_and_reported_subsets_are_separate_draws():
    plan = make_plan(LABELS, num_report=5, num_tune=3, seed=0)
    tune, report = plan.by_role("tune"), plan.by_role("report")
    assert [s.name for s in tune] == ["tune-000", "tune-001", "tune-002"]
    assert len(report) == 5
    assert not {s.indices for s in tune} & {s.indices for s in report}
    masks = plan.masks("report")
    assert masks.shape == (5, len(LABELS)) and masks.dtype == bool
    assert masks[2].sum() == len(report[2].indices)
    # Round trip through the JSON form.
    assert SubsetPlan.from_dict(plan.to_dict()) == plan


def test_the_order_of_the_labels_does_not_change_the_draw():
    # Strata are visited in sorted order, so a relabelled copy draws the same per stratum.
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    a = stratified_subset(["x", "y", "x", "y"], 0.5, rng_a)
    b = stratified_subset(["x", "y", "x", "y"], 0.5, rng_b)
    assert a.tolist() == b.tolist()


def test_bad_alpha_and_role_are_refused():
    with pytest.raises(ValueError, match="alpha=1.0"):
        draw_subsets(LABELS, 2, alpha=1.0)
    with pytest.raises(ValueError, match="role 'x'"):
        draw_subsets(LABELS, 2, role="x")


def test_plan_file_round_trips(tmp_path):
    plan = make_plan(LABELS, num_report=3, num_tune=2, seed=4)
    path = plan.save(tmp_path)
    assert SubsetPlan.load(tmp_path) == plan
    assert len(path.read_text().splitlines()) == 2 + 5  # header line, one line per subset, closing line
