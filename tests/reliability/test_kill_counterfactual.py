"""``counterfactual`` (a batch) killed at each of its write points resumes to the files of an
uninterrupted batch; two workers share a batch without running an experiment twice; a changed
record or image is found, never served, and redone.

Every run works in the same folder (results, retrained models, report), so paths inside records
and in the report's command line agree. Compared byte for byte: the images, the report, the
retrained models' weights (``models/*/unet/``) and the lock files; the records (``seed-*/*.json``)
as parsed JSON without ``retrain_seconds`` (wall-clock) and ``record_sha256`` (a checksum over
it), each of which must pass its checksum. The rest of a retrained model's folder is the trainer's
(its recipe, state and completion marker hold wall-clock seconds) and is left out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dtrak_core.evaluation.counterfactual import load_results, write_report
from dtrak_core.evaluation.units import RECORD_CHECKSUM, CorruptUnitError, read_record
from tests.conftest import write_image_folder
from tests.evaluation.forked import run_cli, start_cli
from tests.reliability import harness

WALL_CLOCK = ("retrain_seconds", RECORD_CHECKSUM)
#: The write points of a batch, in the order it meets them; each run is killed at one, and the
#: next resumes what it left. image@2: the first experiment's "after" image (@1 is its "before").
BATCH_POINTS = ("counterfactual.retrain@1", "counterfactual.image@1", "counterfactual.image@2",
                "counterfactual.result@1", "counterfactual.result@2", "counterfactual.report@1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny model of 10 training images by artists a and b, the folder every run works in)."""
    from dtrak_core.training import TrainConfig, train

    root = tmp_path_factory.mktemp("kill-cf")
    data = write_image_folder(root / "data", n=12, size=16)
    model = train(TrainConfig(data_dir=str(data), out_dir=str(root / "model"), preset="tiny", image_size=16,
                              steps=4, batch_size=4, warmup_steps=2, checkpoint_every=2), progress=False)
    return model, root / "work"


def _args(model: Path, work: Path, *extra) -> list:
    """Two targets x (2 random images, every image of artist a): 4 experiments, 3 retrained models."""
    return ["counterfactual", "--model", model, "--target-seed", "0-1", "--method", "random", "artist:a", "--k", "2",
            "--results", work / "results", "--models-dir", work / "models", "--report", work / "cf.md",
            "--no-progress", *extra]


def _state(work: Path) -> dict:
    files = harness.snapshot(work, ignore=("results/seed-*/*.json", "models/*", "logs/*"))
    files.update({f"models/{name}": digest for name, digest in harness.snapshot(work / "models").items()
                  if "/unet/" in name or name.startswith("locks/")})
    records = {}
    for path in sorted((work / "results").glob("seed-*/*.json")):
        record = read_record(path, "")
        assert record.get(RECORD_CHECKSUM), path
        records[path.relative_to(work).as_posix()] = {k: v for k, v in record.items() if k not in WALL_CLOCK}
    return {"files": files, "records": records}


def _ok(done) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def _fresh(work: Path) -> Path:
    shutil.rmtree(work, ignore_errors=True)
    return work / "logs"


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory) -> Path:
    """A randomly initialised 1-layer CLIP for 16 px images, as save_pretrained writes it."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(setup, embedder_dir) -> dict[str, dict]:
    """The uninterrupted batch ("batch"), then the same batch given an embedding model ("embedded")."""
    model, work = setup
    logs = _fresh(work)
    out = _ok(run_cli(_args(model, work), logs))
    assert out.count(": removed") == 4 and "(stored)" not in out
    batch = _state(work)
    _ok(run_cli(_args(model, work, "--embedding-model", embedder_dir), logs))
    return {"batch": batch, "embedded": _state(work)}


def test_a_batch_killed_at_each_write_point_resumes_to_the_same_files(setup, reference):
    model, work = setup
    logs = _fresh(work)
    for i, point in enumerate(BATCH_POINTS):
        args = _args(model, work)
        done = harness.run_cli(args, fault=point) if i == 3 else run_cli(args, logs, fault=point)
        assert done.returncode == harness.KILLED, (point, done.stdout, done.stderr)
    _ok(run_cli(_args(model, work), logs))
    assert _state(work) == reference["batch"]
    assert not list(work.rglob("*.tmp"))


def test_a_kill_while_adding_the_embedding_cosine_is_repaired(setup, reference, embedder_dir):
    model, work = setup
    logs = _fresh(work)
    _ok(run_cli(_args(model, work), logs))
    with_embedding = _args(model, work, "--embedding-model", embedder_dir)
    assert run_cli(with_embedding, logs, fault="counterfactual.embedding@2").returncode == harness.KILLED
    _ok(run_cli(with_embedding, logs))
    assert _state(work) == reference["embedded"]


def _ran(stdout: str) -> list[str]:
    """The experiments a worker ran itself ("seed 0 random-k2"), not those it read back or skipped."""
    return [line.split(":")[0] for line in stdout.splitlines() if ": removed" in line and "(stored)" not in line]


def test_two_workers_share_a_batch_and_run_each_experiment_once(setup, reference):
    model, work = setup
    logs = _fresh(work)
    # Worker A stops while writing its first record, holding that experiment's lock.
    first = start_cli(_args(model, work), logs, fault="counterfactual.result@1:stop")
    first.wait_stopped()
    second = _ok(run_cli(_args(model, work), logs))
    assert "seed 0 random-k2: another worker is running it; skipped" in second
    first.resume()
    first_out = _ok(first.wait())
    assert _ran(first_out) == ["seed 0 random-k2"]
    assert sorted(_ran(second)) == ["seed 0 artist-a", "seed 1 artist-a", "seed 1 random-k2"]
    assert first_out.count("(stored)") == 3
    assert _state(work) == reference["batch"]  # A's report, written last, holds all four


def _flip_a_digit(path: Path, after: str) -> None:
    text = path.read_text()
    i = text.index(after) + len(after)
    while not text[i].isdigit():
        i += 1
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])


def test_a_changed_record_or_image_is_never_served_and_is_redone(setup, reference):
    model, work = setup
    logs = _fresh(work)
    _ok(run_cli(_args(model, work), logs))
    record = work / "results" / "seed-1" / "random-k2.json"
    _flip_a_digit(record, '"pixel_l2": ')
    with pytest.raises(CorruptUnitError) as error:
        load_results(work / "results")
    assert str(error.value) == (f"{record} does not match its checksum (changed after it was written); run the "
                                "counterfactual again to redo the experiment")
    with pytest.raises(CorruptUnitError):
        write_report(work / "results", work / "other.md", "command")
    assert not (work / "other.md").exists()
    assert [r["tag"] for r in load_results(work / "results", skip_corrupt=True)] == ["artist-a", "random-k2",
                                                                                      "artist-a"]
    image = work / "results" / "seed-0" / "artist-a-after.png"
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, other bytes
    image.write_bytes(bytes(data))
    with pytest.raises(CorruptUnitError, match=f"{image} does not match its checksum"):
        load_results(work / "results")

    out = _ok(run_cli(_args(model, work), logs))
    assert sorted(_ran(out)) == ["seed 0 artist-a", "seed 1 random-k2"]  # the two bad ones, nothing else
    assert _state(work) == reference["batch"]
    assert json.loads(record.read_text())["pixel_l2"] == reference["batch"]["records"][
        "results/seed-1/random-k2.json"]["pixel_l2"]
