"""``generate`` killed (SIGKILL) right after writing an image, then run again: the samples
folder ends byte-identical to an uninterrupted run (the unrecorded image is sampled again)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dtrak_core.cli import main
from tests.reliability.harness import KILLED, run_cli, snapshot


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the harness's child processes
    yield
    torch.set_num_threads(threads)


def generate_args(model_dir: Path, out: Path) -> list[str]:
    return ["generate", "--model", str(model_dir), "--seeds", "0-3", "--steps", "3", "--batch-size", "2",
            "--out", str(out)]


@pytest.mark.parametrize("point,recorded", [("samples.image@1", []), ("samples.image@3", ["0", "1"])])
def test_killed_generate_resumes_to_identical_samples(point, recorded, tiny_model_dir, tmp_path):
    assert main(generate_args(tiny_model_dir, tmp_path / "clean")) == 0
    out = tmp_path / "out"
    killed = run_cli(generate_args(tiny_model_dir, out), fault=point)
    assert killed.returncode == KILLED, killed.stderr
    index = out / "samples.json"
    if recorded:  # the first batch was recorded; the image written after it was not
        assert sorted(json.loads(index.read_text())["sha256"]) == recorded
    else:
        assert not index.exists()
    assert main(generate_args(tiny_model_dir, out)) == 0
    assert snapshot(out) == snapshot(tmp_path / "clean")
