"""``python -m dtrak_core lds ...`` and ``counterfactual``: wiring, errors, a small full run."""

from __future__ import annotations

import json

import numpy as np

from dtrak_core.cli import build_parser, main


def test_subcommands_are_wired_into_the_main_parser():
    parser = build_parser()
    args = parser.parse_args(["lds", "build", "--subsets", "8", "--seeds", "3"])
    assert args.subsets == 8 and args.seeds == [0, 1, 2]
    assert parser.parse_args(["lds", "build", "--seeds", "0,4"]).seeds == [0, 4]
    args = parser.parse_args(["counterfactual", "--target-seed", "0-2", "--method", "dtrak", "random"])
    assert args.target_seed == [0, 1, 2] and args.method == ["dtrak", "random"]


def test_option_defaults_are_the_config_fields_defaults():
    from dtrak_core.evaluation.counterfactual import CounterfactualConfig
    from dtrak_core.evaluation.lds.config import LdsBuildConfig

    parser = build_parser()
    lds, defaults = parser.parse_args(["lds", "build"]), LdsBuildConfig("model", "out")
    for option, name in [("subsets", "num_subsets"), ("tuning_subsets", "num_tuning_subsets"), ("seeds", "seeds"),
                         ("alpha", "alpha"), ("subset_seed", "subset_seed"), ("steps_rule", "steps_rule"),
                         ("measure_timesteps", "measure_timesteps"), ("measure_noise", "measure_noise"),
                         ("generated_seeds", "generated_seeds"), ("max_validation", "max_validation"),
                         ("extra_validation", "extra_validation"), ("ensemble_seeds", "ensemble_seeds"),
                         ("keep_models", "keep_models")]:
        assert getattr(lds, option) == getattr(defaults, name), option
    cf, defaults = parser.parse_args(["counterfactual", "--target-seed", "0"]), CounterfactualConfig("model", 0)
    assert (cf.lam, cf.num_timesteps, cf.projection_dim, cf.steps_rule, cf.random_seed, cf.k) == (
        defaults.lam, defaults.num_timesteps, defaults.projection_dim, defaults.steps_rule, defaults.random_seed,
        defaults.k)
    assert cf.method == [defaults.method]


def test_a_field_option_takes_default_and_help_from_the_field():
    import argparse
    from dataclasses import dataclass, field

    import pytest

    from dtrak_core.cli_options import add_field_option

    @dataclass
    class Toy:
        name: str
        count: int = field(default=3, metadata={"help": "how many (at most 100%)"})
        seeds: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "which seeds"})

    parser = argparse.ArgumentParser()
    add_field_option(parser, Toy, "count", "--count", type=int)
    add_field_option(parser, Toy, "seeds", "--seeds", type=int, nargs="+")
    assert vars(parser.parse_args([])) == {"count": 3, "seeds": [1, 2]}
    assert parser.parse_args(["--count", "5"]).count == 5
    text = " ".join(parser.format_help().split())
    assert "how many (at most 100%) (default: 3)" in text and "which seeds" in text and "[1, 2]" not in text
    with pytest.raises(ValueError, match="Toy.name has no default"):
        add_field_option(parser, Toy, "name", "--name")
    with pytest.raises(ValueError, match="Toy has no field 'size'"):
        add_field_option(parser, Toy, "size", "--size")


def test_bad_input_ends_with_one_sentence(tiny_model_dir, tmp_path, capsys):
    assert main(["lds", "build", "--model", str(tiny_model_dir), "--out", str(tmp_path / "b"), "--subsets", "1"]) == 2
    assert "--subsets 1 must be at least 2" in capsys.readouterr().err
    assert main(["lds", "build", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "b")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["counterfactual", "--model", str(tiny_model_dir), "--target-seed", "0", "--method", "bogus"]) == 2
    assert "unknown attribution method 'bogus'" in capsys.readouterr().err
    assert main(["lds", "score", "--build", str(tmp_path / "nothing")]) == 2
    assert "run 'lds build' first" in capsys.readouterr().err


def test_build_score_and_report_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "build"
    common = ["--model", str(tiny_model_dir), "--out", str(out), "--subsets", "3", "--tuning-subsets", "0",
              "--seeds", "1", "--measure-timesteps", "2", "--generated-seeds", "0-2", "--no-progress"]
    assert main(["lds", "build", *common]) == 0
    assert "3 of 3 models measured" in capsys.readouterr().out
    assert main(["lds", "attribute", "--build", str(out), "--entries", "pixel", "random", "--no-progress"]) == 0
    assert "pixel: written" in capsys.readouterr().out

    # A stored (targets, train) matrix scored directly.
    targets = json.loads((out / "targets" / "targets.json").read_text())
    matrix = np.random.default_rng(0).normal(size=(len(targets["kinds"]), 10)).astype(np.float32)
    np.save(tmp_path / "scores.npy", matrix)
    assert main(["lds", "score", "--build", str(out), "--scores", str(tmp_path / "scores.npy"),
                 "--bootstrap", "10"]) == 0
    printed = capsys.readouterr().out
    assert "generated: LDS" in printed and "3 subsets" in printed

    report = tmp_path / "lds.md"
    assert main(["lds", "score", "--build", str(out), "--bootstrap", "10", "--report", str(report)]) == 0
    text = report.read_text()
    assert "| raw pixel cosine |" in text and "| D-TRAK (square), K=10 | pending | pending |" in text
    assert "lds score" in text
    np.save(tmp_path / "bad.npy", matrix[:, :4])
    assert main(["lds", "score", "--build", str(out), "--scores", str(tmp_path / "bad.npy")]) == 2
    assert "do not match" in capsys.readouterr().err


def test_counterfactual_batch_with_an_embedding_model(tiny_model_dir, clip_dir, tmp_path, capsys):
    results, report = tmp_path / "results", tmp_path / "cf.md"
    args = ["counterfactual", "--model", str(tiny_model_dir), "--target-seed", "0", "--method", "random",
            "--k", "2", "--results", str(results), "--models-dir", str(tmp_path / "models"), "--no-progress"]
    assert main([*args, "--report", str(report)]) == 0
    assert "embedding cos" not in capsys.readouterr().out and "| - | - |" in report.read_text()
    record_path = results / "seed-0" / "random-k2.json"
    trained = json.loads(record_path.read_text())
    # Adding the embedding model later scores the stored images; nothing is retrained.
    assert main([*args, "--embedding-model", str(clip_dir), "--report", str(report)]) == 0
    assert "embedding cos" in capsys.readouterr().out
    record = json.loads(record_path.read_text())
    assert record["retrain_seconds"] == trained["retrain_seconds"] and -1 <= record["embedding_cosine"] <= 1
    assert f"| {record['embedding_cosine']:.3f} | {record['embedding_cosine']:.3f} |" in report.read_text()
    assert main([*args, "--embedding-model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_counterfactual_workers_share_a_batch(tiny_model_dir, tmp_path, capsys):
    import fcntl

    from dtrak_core.evaluation.counterfactual import CounterfactualConfig, experiment_lock_path

    models = tmp_path / "models"
    args = ["counterfactual", "--model", str(tiny_model_dir), "--target-seed", "0-1", "--method", "random",
            "--results", str(tmp_path / "results"), "--models-dir", str(models), "--no-progress",
            "--report", str(tmp_path / "cf.md")]  # never the committed docs/benchmarks/counterfactual.md
    # k given or left to its default (20% of 10 training images = 2) names the same experiment.
    held = experiment_lock_path(CounterfactualConfig(str(tiny_model_dir), 0, "random", k=2,
                                                     models_dir=str(models)))
    held.parent.mkdir(parents=True)
    with open(held, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "seed 0 random-k2: another worker is running it; skipped" in out and "seed 1 random-k2: removed 2" in out
    assert not (tmp_path / "results" / "seed-0").exists() and (tmp_path / "results" / "seed-1" / "random-k2.json").exists()
    assert "| random (k=2) | 1 |" in (tmp_path / "cf.md").read_text()
