"""Benchmark of the app's response times, measured headless with Streamlit's AppTest.

``python -m dtrak_app.bench --model models/emoji3-demo --cache /tmp/benchcache`` measures,
on the Attribute page with the default settings (D-TRAK, K=10, k=2048):

- ``cold``: the first render in a fresh process (loads the model and training set, samples the
  16-image gallery, reads the cached training features, attributes seed 0);
- ``first render, warm cache``: a new session (a new browser tab) in the warm process;
- ``new target``: picking a gallery sample whose scores are not cached (featurize one target,
  score it against the cached training features, draw the page);
- ``new seed``: typing a seed never seen (adds 50 DDIM sampling steps);
- ``attributed target``: going back to a target scored before (score cache hit).

Times are the wall time of ``AppTest.run()`` (the script run and the message serialisation; the
browser's drawing is not included), median over ``--repeats``. The training features must be in
the cache already (``python -m dtrak_core featurize --model M --training-set --cache-dir C/features``).
Writes ``app.json`` and ``app.md`` under ``--out-dir``.

Run it from the repository root (as ``streamlit run app.py`` is): the app's pages import
``dtrak_app`` from there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest

from dtrak_app import common
from dtrak_core.attribution.methods import METHODS
from dtrak_core.attribution.dataset_features import feature_status
from dtrak_core.attribution.loading import load_model, load_training_set
from dtrak_core.training import read_recipe
from dtrak_core.bench import machine_info
from dtrak_core.io import atomic_path, write_json_atomic
from dtrak_core.models import pipeline_files_hash
from dtrak_core.paths import REPO_ROOT

APP = REPO_ROOT / "app.py"


def _timed_run(app, interact=lambda: None) -> float:
    """Wall time of one script run after ``interact()`` (a click, a new value) queued its change."""
    interact()
    start = time.perf_counter()
    app.run()
    elapsed = time.perf_counter() - start
    if app.exception:
        raise RuntimeError(f"the app raised: {app.exception[0].value}")
    if app.info and "not ready" in app.info[0].value:
        raise RuntimeError("the training features are not in the cache; featurize first (see the module docstring)")
    return elapsed


def fresh_cache(model_dir: str, source: Path, dest: Path) -> None:
    """A new cache folder holding only the model's training features (linked from ``source``).

    Every target, sample and score is then computed for real during the benchmark.
    """
    model = load_model(model_dir)
    settings = common.feature_settings(METHODS["dtrak"], common.DEFAULTS["K"], common.DEFAULTS["k"])
    status = feature_status(model, load_training_set(model), settings, source / "features")
    if status.state != "complete":
        raise RuntimeError(f"the training features are {status.state} in {source / 'features'}; run "
                           f"python -m dtrak_core featurize --model {model_dir} --training-set "
                           f"--cache-dir {source / 'features'}")
    (dest / "features").mkdir(parents=True)
    (dest / "features" / status.key).symlink_to(status.folder.resolve())


def bench_app(model_dir: str, repeats: int = 3) -> dict:
    """Seconds per ``AppTest.run()`` of the Attribute page (cold, then medians of ``repeats``).

    The environment (``DTRAK_MODEL_DIR``, ``DTRAK_CACHE``, ...) must already point the app at
    the model and a cache holding its training features (see :func:`main`).
    """

    def session():
        return AppTest.from_file(str(APP), default_timeout=600)

    seeds = list(range(1, 1 + repeats))
    cold = _timed_run(session())
    warm = [_timed_run(session()) for _ in range(repeats)]
    app = session()
    _timed_run(app)
    def click(seed: int):
        return lambda: app.button(key=f"pick_{seed}").click()

    new_target = [_timed_run(app, click(seed)) for seed in seeds]
    revisit = [_timed_run(app, click(seed)) for seed in seeds]
    _timed_run(app, lambda: app.radio(key="target").set_value("seed"))
    fresh = int(time.time()) % 1_000_000 + 100_000  # a seed no earlier run has sampled
    new_seed = [_timed_run(app, lambda i=i: app.number_input(key="seed").set_value(fresh + i))
                for i in range(repeats)]
    return {"cold_first_render_s": round(cold, 2),
            "warm_first_render_s": round(statistics.median(warm), 2),
            "new_target_s": round(statistics.median(new_target), 2),
            "new_seed_s": round(statistics.median(new_seed), 2),
            "attributed_target_s": round(statistics.median(revisit), 2),
            "all": {"warm": warm, "new_target": new_target, "new_seed": new_seed, "revisit": revisit}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrak_app.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="pipeline folder with recipe.json")
    parser.add_argument("--cache", required=True, help="DTRAK_CACHE for the run (holds the training features)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    machine = machine_info(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="dtrak-bench-app-") as scratch:
        fresh_cache(args.model, Path(args.cache), Path(scratch))
        os.environ.update(DTRAK_MODEL_DIR=str(Path(args.model).resolve()), DTRAK_MODEL_NAME=Path(args.model).name,
                          DTRAK_HIDE_DEMO="1", DTRAK_CACHE=scratch)
        results = bench_app(args.model, args.repeats)
    report = {"command": "python -m dtrak_app.bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": machine, **results}
    recipe = read_recipe(args.model) or {}
    report["model"] = {"path": str(args.model), "weights_sha256": pipeline_files_hash(args.model),
                       "steps_done": recipe.get("steps_done"), "train_images": recipe.get("num_train_images"),
                       "parameters": recipe.get("parameters")}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out_dir / "app.json", report)
    lines = [
        "# App response times (Attribute page)", "",
        f"Command: `{report['command']}`", "",
        f"Model: {report['model']['path']} ({report['model']['parameters']} parameters, "
        f"{report['model']['train_images']} training images, trained {report['model']['steps_done']} steps; "
        f"weights {report['model']['weights_sha256'][:12]}). Speed does not depend on how far it is trained.", "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs (1-min load average "
        f"{machine['load_average_1min']} before the run), torch "
        f"{machine['torch']} with {machine['torch_threads']} thread(s); default settings D-TRAK, K=10, k=2048, "
        "lambda=100; training features already cached. Wall time of `AppTest.run()` (script run, no browser "
        f"drawing), median of {args.repeats}.", "",
        "| what | seconds | target |", "|---|---|---|",
        f"| first render, cold process (load model + data, sample the gallery, read features) | {results['cold_first_render_s']} | |",
        f"| first render, warm cache (a new tab) | {results['warm_first_render_s']} | < 3 |",
        f"| new target from the gallery against cached training features | {results['new_target_s']} | < 3 |",
        f"| new seed (adds 50 DDIM sampling steps) | {results['new_seed_s']} | |",
        f"| target attributed before (score cache) | {results['attributed_target_s']} | |", "",
    ]
    with atomic_path(args.out_dir / "app.md") as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
