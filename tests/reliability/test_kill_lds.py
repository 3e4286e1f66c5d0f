"""``lds build`` killed at each of its write points resumes to the files of an uninterrupted build;
two workers share a build without training a model twice; a changed byte is found and redone.

Compared byte for byte: every file of the build folder except the output files ``outputs/*.json``,
which hold wall-clock seconds (``train_seconds``, ``measure_seconds``, also per extension) and so
a checksum over them: those are compared as parsed records without these fields, and each must
pass its own checksum.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dtrak_core.evaluation.lds.outputs import load_outputs
from dtrak_core.evaluation.lds.targets import Targets
from dtrak_core.evaluation.units import RECORD_CHECKSUM, CorruptUnitError, read_record
from tests.conftest import write_image_folder
from tests.evaluation.forked import run_cli, start_cli
from tests.reliability import harness

TIMINGS = ("train_seconds", "measure_seconds", RECORD_CHECKSUM)
#: The write points of a first build, in the order it meets them (``lds.outputs``: the full model's
#: output first, then each subset model's).
FIRST_BUILD_POINTS = ("lds.gitignore", "lds.targets.images", "lds.targets", "lds.build_file", "lds.subsets",
                      "lds.outputs", "lds.retrain.model", "lds.outputs", "lds.retrain.cleanup")
#: Those of adding validation targets to a finished build (every model is retrained and extended).
EXTENSION_POINTS = ("lds.targets.images", "lds.targets", "lds.build_file", "lds.outputs", "lds.retrain.model",
                    "lds.outputs", "lds.retrain.cleanup")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A model of artists b and c (10 images); the held-out images of artist d can be added as targets."""
    from dtrak_core.training import TrainConfig, train

    root = tmp_path_factory.mktemp("kill-lds")
    data = write_image_folder(root / "data", n=24, size=16, artists=("a", "b", "c", "d"))
    return train(TrainConfig(data_dir=str(data), out_dir=str(root / "model"), preset="tiny", image_size=16, steps=4,
                             batch_size=4, warmup_steps=2, checkpoint_every=2, filter_column="artist",
                             filter_values=["b", "c"]), progress=False)


def _build_args(model: Path, out: Path, *extra: str) -> list:
    return ["lds", "build", "--model", model, "--out", out, "--subsets", "3", "--tuning-subsets", "0", "--seeds", "1",
            "--measure-timesteps", "2", "--generated-seeds", "0", "--no-progress", *extra]


EXTEND = ("--extra-validation", "artist=d")


def _outputs(out: Path) -> dict[str, dict]:
    """Each output record (checksum verified) without its wall-clock fields."""
    records = {}
    for path in sorted((out / "outputs").glob("*.json")):
        record = read_record(path, "")
        assert record.get(RECORD_CHECKSUM), path
        record = {k: v for k, v in record.items() if k not in TIMINGS}
        record["extensions"] = [{k: v for k, v in e.items() if k not in TIMINGS} for e in record.get("extensions", [])]
        records[path.name] = record
    return records


def _state(out: Path) -> tuple[dict, dict]:
    """(sha256 of every file but the outputs, the outputs without their timings)."""
    return harness.snapshot(out, ignore=("outputs/*.json",)), _outputs(out)


def _ok(done) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """An uninterrupted build ("built"), then the same build extended by artist d's images ("extended")."""
    root = tmp_path_factory.mktemp("lds-reference")
    out = root / "build"
    assert "3 of 3 models measured" in _ok(run_cli(_build_args(model, out), root / "logs"))
    built = _state(out)
    _ok(run_cli(_build_args(model, out, *EXTEND), root / "logs"))
    return {"built": built, "extended": _state(out)}


def _kill_chain(model: Path, out: Path, logs: Path, points: tuple[str, ...], extra: tuple = ()) -> None:
    """Run the build once per point, each run killed at the first hit of its point (so each
    resumes what the one before left); one of them as a real process (the harness's run_cli)."""
    for i, point in enumerate(points):
        args = _build_args(model, out, *extra)
        done = harness.run_cli(args, fault=f"{point}@1") if i == 5 else run_cli(args, logs, fault=f"{point}@1")
        assert done.returncode == harness.KILLED, (point, done.stdout, done.stderr)


def test_a_build_killed_at_each_write_point_resumes_to_the_same_files(model, reference, tmp_path):
    out, logs = tmp_path / "build", tmp_path / "logs"
    _kill_chain(model, out, logs, FIRST_BUILD_POINTS)
    assert "3 of 3 models measured" in _ok(run_cli(_build_args(model, out), logs))
    assert _state(out) == reference["built"]

    _kill_chain(model, out, logs, EXTENSION_POINTS, EXTEND)
    _ok(run_cli(_build_args(model, out, *EXTEND), logs))
    assert _state(out) == reference["extended"]
    assert not list(out.rglob("*.tmp")) and sorted(p.name for p in (out / "runs").iterdir()) == [
        "build.lock", "full.lock", "generated"]


def test_a_kill_between_images_and_names_leaves_the_old_targets_whole(model, reference, tmp_path):
    """Killed after images.npy gained artist d's rows, before targets.json did: readers still see
    the old targets, and the build without the filter goes on as if it had never been asked."""
    out, logs = tmp_path / "build", tmp_path / "logs"
    _ok(run_cli(_build_args(model, out), logs))
    assert run_cli(_build_args(model, out, *EXTEND), logs, fault="lds.targets@1").returncode == harness.KILLED
    assert len(np.load(out / "targets" / "images.npy")) == 5  # 2 + 1 old targets, 2 new rows
    assert load_outputs(out, "report").losses.shape == (3, 3)
    _ok(run_cli(_build_args(model, out), logs))
    assert _state(out) == reference["built"]


def test_two_workers_share_a_build_and_train_each_model_once(model, reference, tmp_path):
    out, logs = tmp_path / "build", tmp_path / "logs"
    # Worker A stops while writing the first subset model's output (the full model's is the first
    # output), holding that model's lock; worker B runs the whole build meanwhile.
    first = start_cli(_build_args(model, out), logs, fault="lds.outputs@2:stop")
    first.wait_stopped()
    second = _ok(run_cli(_build_args(model, out), logs))
    assert "2 of 3 models measured" in second
    first.resume()
    first_out = _ok(first.wait())
    assert "3 of 3 models measured" in first_out
    lines = [line.split(":")[0] for text in (first_out, second) for line in text.splitlines()
             if ": trained" in line or line.startswith("full: measured")]
    assert sorted(lines) == ["full", "report-000-s0", "report-001-s0", "report-002-s0"]  # each once
    assert _state(out) == reference["built"]


def _flip_a_digit(path: Path, after: str) -> None:
    """Change one digit after the first ``after`` in ``path``: same size, other bytes."""
    text = path.read_text()
    i = text.index(after) + len(after)
    while not text[i].isdigit():
        i += 1
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])


def test_corrupted_units_are_found_never_served_and_redone(model, reference, tmp_path):
    out, logs = tmp_path / "build", tmp_path / "logs"
    _ok(run_cli(_build_args(model, out), logs))
    output = out / "outputs" / "report-001-s0.json"
    size = output.stat().st_size
    _flip_a_digit(output, '"losses": [')
    assert output.stat().st_size == size
    message = (f"{output} does not match its checksum (changed after it was written); run 'lds build' again to "
               "measure that model again")
    with pytest.raises(CorruptUnitError) as error:
        load_outputs(out, "report")
    assert str(error.value) == message
    done = run_cli(["lds", "score", "--build", out, "--bootstrap", "10"], logs)
    assert done.returncode == 2 and done.stderr == f"error: {message}\n"

    images = out / "targets" / "images.npy"
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF  # a pixel of the last target
    images.write_bytes(bytes(data))
    with pytest.raises(CorruptUnitError, match="images.npy does not match the checksum in targets.json"):
        Targets.load(out / "targets")
    _flip_a_digit(out / "subsets.json", '"indices":[')

    rebuilt = _ok(run_cli(_build_args(model, out), logs))
    assert f"{output} fails its checksum: measuring report-001-s0 again" in rebuilt
    assert [line.split(":")[0] for line in rebuilt.splitlines() if ": trained" in line] == ["report-001-s0"]
    assert _state(out) == reference["built"]

    build_file = out / "lds.json"
    _flip_a_digit(build_file, '"measure_timesteps": ')
    done = run_cli(_build_args(model, out), logs)
    assert done.returncode == 2 and done.stderr == (
        f"error: {build_file} does not match its checksum (changed after it was written); restore it (it is "
        "committed with the build) or start another --out\n")


def test_a_changed_score_matrix_is_computed_again(model, reference, tmp_path):
    from dtrak_core.evaluation.lds.scores import compute_scores, get_entry, load_scores

    out, logs = tmp_path / "build", tmp_path / "logs"
    _ok(run_cli(_build_args(model, out), logs))
    grid = [get_entry("pixel")]
    assert compute_scores(out, grid, progress=False) == {"pixel": "written"}
    matrix = out / "scores" / "pixel.npz"
    stored = load_scores(matrix)[1]
    assert compute_scores(out, grid, progress=False) == {"pixel": "cached"}
    data = bytearray(matrix.read_bytes())
    data[len(data) // 2] ^= 0x01
    matrix.write_bytes(bytes(data))
    with pytest.raises(CorruptUnitError, match=f"{matrix} does not match its checksum"):
        load_scores(matrix)
    assert compute_scores(out, grid, progress=False) == {"pixel": "written"}
    # The same matrix again (np.savez stamps the zip entries with the time, so compare arrays).
    assert np.array_equal(load_scores(matrix)[1], stored)
    assert compute_scores(out, grid, progress=False) == {"pixel": "cached"}


def _scored(out: Path) -> dict:
    """The score matrices, their markers and the results of ``lds attribute|score``, as values: a
    ``.npz`` stamps its zip entries with the time, so neither its bytes nor a checksum over them
    (``file_sha256``, ``record_sha256``) can repeat."""
    def fields(record: dict) -> dict:
        return {k: v for k, v in record.items() if k not in ("file_sha256", RECORD_CHECKSUM)}

    values = {"results": fields(read_record(out / "results" / "lds.json", ""))}
    for path in [*sorted((out / "scores").glob("*.npz")), out / "results" / "predictions.npz"]:
        with np.load(path) as data:
            values[path.name] = {key: data[key] for key in data.files}
    for path in sorted((out / "scores").glob("*.json")):
        values[path.name] = fields(read_record(path, ""))
    return values


def test_attribute_and_score_killed_at_each_write_point_resume_to_the_same_results(model, tmp_path):
    built, logs = tmp_path / "built", tmp_path / "logs"
    _ok(run_cli(_build_args(model, built), logs))

    def attribute(out: Path) -> list:
        return ["lds", "attribute", "--build", out, "--entries", "pixel", "random", "--no-progress"]

    def score(out: Path) -> list:
        return ["lds", "score", "--build", out, "--bootstrap", "20"]

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for out in (clean, killed):
        shutil.copytree(built, out)
    assert "pixel: written" in _ok(run_cli(attribute(clean), logs))
    _ok(run_cli(score(clean), logs))
    for command, point in ((attribute, "lds.scores@1"), (attribute, "lds.scores.marker@1"),
                           (attribute, "lds.scores.marker@2"), (score, "lds.results.predictions@1"),
                           (score, "lds.results@1")):
        assert run_cli(command(killed), logs, fault=point).returncode == harness.KILLED, point
    assert _ok(run_cli(attribute(killed), logs)).split() == "pixel: cached random: written".split()
    _ok(run_cli(score(killed), logs))
    np.testing.assert_equal(_scored(killed), _scored(clean))
    assert not list(killed.rglob("*.tmp"))
