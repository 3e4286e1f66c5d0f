"""Benchmark of the app's response times, measured headless with Streamlit's AppTest.

``python -m dtrak_app.bench --model models/emoji3-demo --cache /tmp/benchcache`` measures,
on the Attribute page with the default settings (D-TRAK, K=10, k=2048):

- ``cold``: the first render in a fresh process (loads the model and training set, samples the
  16-image gallery, reads the cached training features, attributes seed 0);
- ``first render, warm cache``: a new session (a new browser tab) in the warm process;
- ``new target``: picking a gallery sample whose scores are not cached (featurize one target,
  score it against the cached training features, draw the page);
- ``new seed``: typing a seed never seen (adds 50 DDIM sampling steps);
- ``attributed target``: going back to a target scored before (score cache hit);
- ``first view after make run``: what ``make run``'s first page load costs. A cache prepared by
  ``python -m dtrak_app.prepare`` (training features linked, gallery samples and calibration made
  there), then a fresh interpreter that has imported only Streamlit (as the server has before
  its first session) renders the Attribute page at the defaults: the imports of the app and
  torch, loading the model and training set, seed 0's scores (prepared at the calibrated lambda;
  computed when the app's default differs). It must show D-TRAK's results (the run fails
  otherwise). Median of ``--repeats`` fresh processes.

Times are the wall time of ``AppTest.run()`` (the script run and the message serialisation; the
browser's drawing is not included), median over ``--repeats``. The training features must be in
the cache already (``python -m dtrak_core featurize --model M --training-set --cache-dir C/features``).
Writes ``app.json`` and ``app.md`` under ``--out-dir``.

Run it from the repository root (as ``streamlit run app.py`` is): the app's pages import
``dtrak_app`` from there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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


#: Run in a fresh interpreter by :func:`first_view_seconds`: the first render of the app, timed
#: from before the app's own imports (the server has imported Streamlit only when a first
#: browser session arrives); prints the seconds and whether D-TRAK's results were shown.
FIRST_VIEW_SCRIPT = """
import json, sys, time
from streamlit.testing.v1 import AppTest
start = time.perf_counter()
app = AppTest.from_file(sys.argv[1], default_timeout=900).run()
seconds = time.perf_counter() - start
shown = [c.value for c in app.caption if c.value.startswith("Method: ")]
print(json.dumps({"seconds": seconds, "exception": [str(e.value) for e in app.exception],
                  "waiting": [i.value for i in app.info if "not ready" in i.value], "method": shown}))
"""


def first_view_seconds(env: dict[str, str]) -> float:
    """Seconds of the first Attribute render in a fresh interpreter (``FIRST_VIEW_SCRIPT``) with
    ``env``; RuntimeError unless it showed D-TRAK's results."""
    done = subprocess.run([sys.executable, "-c", FIRST_VIEW_SCRIPT, str(APP)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the first-view run failed: {done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["exception"] or result["waiting"] or not any("D-TRAK" in m for m in result["method"]):
        raise RuntimeError(f"the first view did not show D-TRAK's results: {result}")
    return float(result["seconds"])


def prepared_cache(model_dir: str, source: Path, dest: Path) -> None:
    """A new cache as ``make run`` leaves it: the training features linked from ``source``, then
    ``dtrak_app.prepare`` (the gallery samples and the calibration, made there)."""
    from dtrak_app import prepare

    fresh_cache(model_dir, source, dest)
    saved = os.environ.get("DTRAK_CACHE")
    os.environ["DTRAK_CACHE"] = str(dest)
    try:
        print(prepare.prepare(progress=False).summary(), flush=True)
    finally:
        os.environ.pop("DTRAK_CACHE") if saved is None else os.environ.__setitem__("DTRAK_CACHE", saved)


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


def report_lines(report: dict, repeats: int) -> list[str]:
    """``app.md`` from the ``app.json`` record."""
    machine, results = report["machine"], report
    lines = [
        "# App response times (Attribute page)", "",
        f"Command: `{report['command']}` (from the repository root; {report['date']})", "",
        f"Model: {report['model']['path']} ({report['model']['parameters']} parameters, "
        f"{report['model']['train_images']} training images, trained {report['model']['steps_done']} steps; "
        f"weights {report['model']['weights_sha256'][:12]}). Speed does not depend on how far it is trained.", "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs (1-min load average "
        f"{machine['load_average_1min']} before the run), torch "
        f"{machine['torch']} with {machine['torch_threads']} thread(s); default settings D-TRAK, K=10, k=2048, "
        "the app's default lambda; training features already cached (1-min load average after the run "
        f"{report['load_average_1min_after']}). Wall time of `AppTest.run()` (script run, no browser "
        f"drawing), median of {repeats}.", "",
        "| what | seconds | target |", "|---|---|---|",
        f"| first view after `make run` (a fresh process: imports of the app and torch, model, training set, the "
        f"page; gallery, calibration and seed 0's scores prepared) | {results['first_view_after_prepare_s']} | < 10 |",
        f"| first render, cold process (load model + data, sample the gallery, read features) | {results['cold_first_render_s']} | |",
        f"| first render, warm cache (a new tab) | {results['warm_first_render_s']} | < 3 |",
        f"| new target from the gallery against cached training features | {results['new_target_s']} | < 3 |",
        f"| new seed (adds 50 DDIM sampling steps) | {results['new_seed_s']} | |",
        f"| target attributed before (score cache) | {results['attributed_target_s']} | |", "",
        "`make run` on a fresh clone, from nothing to a served page: [app-first-run.md](app-first-run.md).", "",
    ]
    if machine["load_average_1min"] > machine["cpu_count"]:
        lines[-2:-2] = [f"The machine was shared (load average above its {machine['cpu_count']} CPUs): every time "
                        "above is inflated by the other processes; compare rows of one report.", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dtrak_app.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="pipeline folder with recipe.json")
    parser.add_argument("--cache", required=True, help="DTRAK_CACHE for the run (holds the training features)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs" / "benchmarks")
    args = parser.parse_args(argv)
    machine = machine_info(torch.device("cpu"))
    # The app sees only this model; DTRAK_TOKEN cleared, or every run would see the sign-in form.
    os.environ.update(DTRAK_MODEL_DIR=str(Path(args.model).resolve()), DTRAK_MODEL_NAME=Path(args.model).name,
                      DTRAK_HIDE_DEMO="1", DTRAK_DATA_DIR="", DTRAK_TOKEN="")
    with tempfile.TemporaryDirectory(prefix="dtrak-bench-app-") as scratch:
        prepared_cache(args.model, Path(args.cache), Path(scratch))
        first_view = [first_view_seconds({**os.environ, "DTRAK_CACHE": scratch}) for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory(prefix="dtrak-bench-app-") as scratch:
        fresh_cache(args.model, Path(args.cache), Path(scratch))
        os.environ["DTRAK_CACHE"] = scratch
        results = bench_app(args.model, args.repeats)
    results = {"first_view_after_prepare_s": round(statistics.median(first_view), 2), **results}
    results["all"]["first_view_after_prepare"] = first_view
    report = {"command": "python -m dtrak_app.bench " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%d %H:%M %Z"), "repeats": args.repeats, "machine": machine, **results}
    report["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    recipe = read_recipe(args.model) or {}
    report["model"] = {"path": str(args.model), "weights_sha256": pipeline_files_hash(args.model),
                       "steps_done": recipe.get("steps_done"), "train_images": recipe.get("num_train_images"),
                       "parameters": recipe.get("parameters")}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out_dir / "app.json", report)
    lines = report_lines(report, args.repeats)
    with atomic_path(args.out_dir / "app.md") as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
