"""The app's score cache: keyed by everything that changes a score (the scheduler too), one
writer per context, marker written last, checksums verified on read."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dtrak_app.score_cache import ScoreCache, ScoreCacheError, model_hashes, score_context, target_key
from dtrak_core.io import FAULT_ENV
from tests.reliability.harness import KILLED, REPO, snapshot

MODEL = {"model_weights_sha256": "w", "scheduler_sha256": "s", "noise_schedule_sha256": "b"}
CONTEXT = score_context(MODEL, "train", "dtrak", {"k": 8}, 10.0)
IMAGE = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
SCORES = np.array([3.0, 1.0, 2.0], dtype=np.float32)


def test_models_differing_only_in_their_scheduler_do_not_share_scores(tmp_path):
    from diffusers import DDPMScheduler

    from dtrak_core.attribution.loading import load_model
    from dtrak_core.models import UNET_PRESETS, make_scheduler
    from dtrak_core.tasks import UnconditionalPixelTask

    tiny_unet = UNET_PRESETS["tiny"].build(image_size=16, seed=0)
    UnconditionalPixelTask(tiny_unet, make_scheduler()).save(tmp_path / "a")
    other = DDPMScheduler.from_config({**make_scheduler().config, "beta_schedule": "squaredcos_cap_v2"})
    UnconditionalPixelTask(tiny_unet, other).save(tmp_path / "b")
    a, b = model_hashes(load_model(tmp_path / "a")), model_hashes(load_model(tmp_path / "b"))
    assert a["model_weights_sha256"] == b["model_weights_sha256"]
    assert a["scheduler_sha256"] != b["scheduler_sha256"] and a["noise_schedule_sha256"] != b["noise_schedule_sha256"]
    first = ScoreCache(tmp_path / "scores", score_context(a, "train", "dtrak", {"k": 8}, 10.0))
    first.put(target_key(IMAGE), SCORES, IMAGE, {"label": "seed 0"})
    second = ScoreCache(tmp_path / "scores", score_context(b, "train", "dtrak", {"k": 8}, 10.0))
    assert second.folder != first.folder and second.get(target_key(IMAGE)) is None
    # Only the scheduler differs: each field of the context changes the key.
    for name in MODEL:
        assert ScoreCache(tmp_path, score_context({**MODEL, name: "x"}, "train", "dtrak", {"k": 8}, 10.0)).folder \
            != ScoreCache(tmp_path, CONTEXT).folder
    with pytest.raises(ValueError, match="needs the model's scheduler_sha256, noise_schedule_sha256; use model_hashes"):
        score_context({"model_weights_sha256": "w"}, "train", "dtrak", None, 10.0)


def test_damaged_scores_or_image_are_never_served(tmp_path):
    cache = ScoreCache(tmp_path, CONTEXT)
    key = target_key(IMAGE)
    cache.put(key, SCORES, IMAGE, {"label": "seed 0"})
    np.testing.assert_array_equal(cache.get(key), SCORES)
    npy = cache.folder / f"{key}.npy"
    clean = npy.read_bytes()
    npy.write_bytes(clean[:-4] + np.float32(9.0).tobytes())  # same size, other bytes
    assert cache.get(key) is None and cache.targets() == [] and cache.reverse_lookup(0).empty
    cache.put(key, SCORES, IMAGE, {"label": "seed 0"})  # the caller recomputes: repaired
    assert npy.read_bytes() == clean and [t["label"] for t in cache.targets()] == ["seed 0"]
    png = cache.folder / f"{key}.png"
    png.write_bytes(png.read_bytes()[:-1] + b"\0")
    assert cache.targets() == []
    with pytest.raises(ScoreCacheError, match=rf"{key}\.png is missing or does not match its checksum"):
        cache.image(key)
    (cache.folder / f"{key}.json").write_text("{not json")
    assert cache.get(key) is None


PUT = """
import sys, numpy as np
from dtrak_app.score_cache import ScoreCache
context, key = {context!r}, {key!r}
ScoreCache(sys.argv[1], context).put(key, np.array([3.0, 1.0, 2.0]), np.arange(48, dtype=np.uint8).reshape(4, 4, 3),
                                     {{"label": "seed 0"}})
"""


def test_a_put_killed_before_its_marker_leaves_no_target_and_a_rerun_repairs_it(tmp_path):
    key = target_key(IMAGE)
    ScoreCache(tmp_path / "clean", CONTEXT).put(key, SCORES, IMAGE, {"label": "seed 0"})
    env = {"PYTHONPATH": str(REPO), FAULT_ENV: "scores.put", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", PUT.format(context=CONTEXT, key=key), str(tmp_path / "out")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == KILLED, killed.stderr
    cache = ScoreCache(tmp_path / "out", CONTEXT)
    assert (cache.folder / f"{key}.npy").exists() and not (cache.folder / f"{key}.json").exists()
    assert cache.get(key) is None and cache.targets() == []
    cache.put(key, SCORES, IMAGE, {"label": "seed 0"})
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "clean")
    assert json.loads((cache.folder / f"{key}.json").read_text())["sha256"].keys() == {".npy", ".png"}
