"""The committed LDS and counterfactual tables reproduce unchanged from the stored results.

A refactor of the evaluation code must not move a committed number:

(a) the cheap LDS entries (``pixel``, ``random``) scored again on a copy of the committed build
    (targets, subsets, measured outputs) give exactly the committed ``results/lds.json`` records,
    and the build resumed with its own settings has nothing to do and rewrites its files unchanged;
(b) the LDS report written from the committed results is ``docs/benchmarks/lds.md``, except
    the line on score files (not committed) and the commands of the final code block;
(c) the counterfactual report written from the committed records is
    ``docs/benchmarks/counterfactual.md``, except its command line.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

import dtrak_core.training as training
from dtrak_core.datasets import DatasetError
from dtrak_core.evaluation.counterfactual import write_report as write_counterfactual_report
from dtrak_core.evaluation.lds.build import build_lds
from dtrak_core.evaluation.lds.config import TARGET_KINDS, LdsBuildConfig
from dtrak_core.evaluation.lds.report import write_report as write_lds_report
from dtrak_core.evaluation.lds.scores import compute_scores, evaluate, get_entry
from dtrak_core.paths import MINI_MODEL_DIR, REPO_ROOT
from dtrak_core.training import read_recipe_config, resolve_data_dir

LDS_BUILD = REPO_ROOT / "benchmarks" / "lds" / "emoji3-mini"
LDS_DOC = REPO_ROOT / "docs" / "benchmarks" / "lds.md"
CF_RESULTS = REPO_ROOT / "benchmarks" / "counterfactual" / "emoji3-mini"
CF_DOC = REPO_ROOT / "docs" / "benchmarks" / "counterfactual.md"
CHEAP_ENTRIES = ("pixel", "random")


def _assert_same(actual, expected, where: str = "") -> None:
    """Equal structures; floats equal to 1e-12 (NaN equals NaN)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), f"{where}: keys differ"
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) or isinstance(actual, float):
        assert actual is not None and expected is not None, f"{where}: {actual} != {expected}"
        if math.isnan(expected):
            assert math.isnan(actual), f"{where}: {actual} is not NaN"
        else:
            assert actual == pytest.approx(expected, abs=1e-12, rel=0), f"{where}: {actual} != {expected}"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _training_data_or_skip() -> None:
    """The committed build's training images (the emoji3-16 dataset) must be built (``make data``)."""
    recipe = read_recipe_config(MINI_MODEL_DIR)
    try:
        resolve_data_dir(recipe["config"]["data_dir"], MINI_MODEL_DIR)
    except DatasetError as error:
        pytest.skip(f"the mini model's training data is not built here ({error}); run 'make data'")


def test_cheap_lds_entries_reproduce_the_committed_numbers(tmp_path, monkeypatch):
    _training_data_or_skip()
    monkeypatch.chdir(REPO_ROOT)  # the build records its model folder relative to the repository
    build = tmp_path / "emoji3-mini"
    shutil.copytree(LDS_BUILD, build)
    assert not (build / "scores").exists() and not (build / "runs").exists()
    committed = json.loads((LDS_BUILD / "results" / "lds.json").read_text())
    entries = [get_entry(name) for name in CHEAP_ENTRIES]
    assert compute_scores(build, entries, progress=False) == {name: "written" for name in CHEAP_ENTRIES}
    results = evaluate(build, entries)

    for name in CHEAP_ENTRIES:
        for kind in TARGET_KINDS:
            record = results["entries"][name]["kinds"][kind]
            assert record["status"] == "measured" and record["report_subsets"] == 64
            _assert_same(record, committed["entries"][name]["kinds"][kind], f"{name}/{kind}")
    # Everything that depends on the measured outputs only is unchanged too.
    _assert_same(results["progress"], committed["progress"], "progress")
    _assert_same(results["common_factor_share"], committed["common_factor_share"], "common_factor_share")
    assert results["report_subsets"] == committed["report_subsets"]
    with np.load(build / "results" / "predictions.npz") as new, \
            np.load(LDS_BUILD / "results" / "predictions.npz") as old:
        for key in (f"{name}/{kind}" for name in CHEAP_ENTRIES for kind in TARGET_KINDS):
            np.testing.assert_array_equal(new[key], old[key])


def test_the_committed_build_resumes_with_nothing_to_do(tmp_path, monkeypatch):
    """Its own settings (from ``lds.json``) find every model measured, and the build file (with
    the measured timesteps of the model's T), subsets and targets are rewritten byte for byte."""
    _training_data_or_skip()
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(training, "train", lambda *a, **k: pytest.fail("a measured model was retrained"))
    build = tmp_path / "emoji3-mini"
    shutil.copytree(LDS_BUILD, build)
    record = json.loads((LDS_BUILD / "lds.json").read_text())
    config = LdsBuildConfig(model_dir=record["model_dir"], out_dir=str(build), num_subsets=record["num_subsets"],
                            num_tuning_subsets=record["num_tuning_subsets"], seeds=record["seeds"],
                            ensemble_seeds=record["ensemble_seeds"], extra_validation=record["extra_validation"],
                            **record["identity"])
    result = build_lds(config, progress=False)
    assert result["done"] == result["total"] == 163  # 80 subsets x 2 seeds + 3 ensemble models
    for name in ("lds.json", "subsets.json", "targets/images.npy", "targets/targets.json"):
        assert (build / name).read_bytes() == (LDS_BUILD / name).read_bytes(), name
    for path in sorted((LDS_BUILD / "outputs").glob("*.json")):
        assert (build / "outputs" / path.name).read_bytes() == path.read_bytes(), path.name


def _code_block_start(lines: list[str]) -> int:
    """Index of the last ``` fence that opens a code block (the regeneration commands)."""
    return max(i for i, line in enumerate(lines) if line.startswith("```") and line != "```")


def test_the_lds_report_is_the_committed_one(tmp_path):
    written = write_lds_report(LDS_BUILD, tmp_path / "lds.md", "python -m dtrak_core lds score").read_text()
    new, old = written.splitlines(), LDS_DOC.read_text().splitlines()
    # Score files are not committed: the features line of a fresh checkout says so.
    assert sum(line.startswith("- features:") for line in old) == 1
    new = [line for line in new if not line.startswith("- features:")]
    old = [line for line in old if not line.startswith("- features:")]
    fence_new, fence_old = _code_block_start(new), _code_block_start(old)
    assert new[:fence_new + 1] == old[:fence_old + 1]
    # The commands themselves depend on where the report was asked for; the block still holds
    # build, attribute and score, and nothing follows it.
    assert new[-1] == old[-1] == "```"
    assert [line.split()[4] for line in new[fence_new + 1:-1]] == ["build", "attribute", "score"]
    assert len(new) - fence_new == len(old) - fence_old


def test_the_counterfactual_report_is_the_committed_one(tmp_path):
    command = "python -m dtrak_core counterfactual --report x"
    written = write_counterfactual_report(CF_RESULTS, tmp_path / "counterfactual.md", command).read_text()
    new, old = written.splitlines(), CF_DOC.read_text().splitlines()
    commands_old = [i for i, line in enumerate(old) if line.startswith("python -m dtrak_core counterfactual")]
    assert len(commands_old) == 1 and new.count(command) == 1
    new[new.index(command)] = old[commands_old[0]]
    assert new == old
