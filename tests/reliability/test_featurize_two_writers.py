"""Two ``featurize`` processes of the same key at once, the first one delayed while it creates
the array (a slow disk): the second waits for it, says so, and reuses its features; every row is
computed once and the result equals a single clean run byte for byte."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

import torch

from dtrak_core.attribution.feature_store import MANIFEST
from dtrak_core.cli import main
from dtrak_core.io import FAULT_ENV
from tests.reliability.harness import REPO, snapshot
from tests.reliability.test_kill_featurize import featurize_args


def start(args: list[str], fault: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen([sys.executable, "-m", "dtrak_core", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(stream, text: str, guard_seconds: float = 300) -> str:
    """stderr lines up to the one containing ``text`` (the guard only stops a hung test)."""
    seen = ""
    while text not in seen:
        ready, _, _ = select.select([stream], [], [], guard_seconds)
        line = stream.readline() if ready else ""
        assert line, f"the stream ended or stalled before {text!r}; it said:\n{seen}"
        seen += line
    return seen


def test_a_second_writer_waits_for_the_first_and_reuses_its_features(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    args = featurize_args(tiny_model_dir, cache)
    first = start(args, fault="features.create@1:stop")
    _, status = os.waitpid(first.pid, os.WUNTRACED)  # it holds the key's lock, its array half made
    assert os.WIFSTOPPED(status)
    second = start(args)
    try:
        said = read_until(second.stderr, "waiting for another process writing")
        (folder,) = [p for p in cache.iterdir() if p.is_dir()]
        assert (f"waiting for another process writing features {folder.name} ({folder}); they will be reused "
                "when it finishes\n") in said
        assert second.poll() is None and not (folder / MANIFEST).exists()  # waiting, nothing written
    finally:
        first.send_signal(signal.SIGCONT)
    out_first, err_first = first.communicate(timeout=600)
    out_second, err_second = second.communicate(timeout=600)
    assert first.returncode == 0, err_first
    assert second.returncode == 0, err_second
    assert out_first == out_second == f"10 x 64 features in {folder}\n"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["batches_done"] == 3  # each batch computed once

    clean = tmp_path / "clean"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the child processes
    try:
        assert main(featurize_args(tiny_model_dir, clean)) == 0
    finally:
        torch.set_num_threads(threads)
    ignore = (f"*/{MANIFEST}",)
    assert snapshot(cache, ignore) == snapshot(clean, ignore)  # the features byte for byte
    clean_manifest = json.loads(next(clean.glob(f"*/{MANIFEST}")).read_text())
    assert manifest["batches"] == clean_manifest["batches"]
