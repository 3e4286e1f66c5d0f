"""Training features the app needs but the store does not hold: what computing them would take, a
Start button, the queue and progress. Long work starts only when the user asks for it.

A page asks :func:`features_pending` (None when the features are ready; it never starts
anything) and shows :func:`wait_for_features`, which says, by the job's state, what is missing:

- no job yet (or a finished job whose features were deleted since): how many images, an
  estimate of the time and peak memory *measured on this model at these settings* (see below),
  the jobs it would wait behind, and a **Start** button;
- queued: its position in the machine's queue (``dtrak_core.jobs``: one job at a time unless
  ``DTRAK_JOB_SLOTS`` says more) and Cancel;
- running: progress and ETA, Cancel;
- failed: the reason and the log's last lines, Start again; cancelled: that it was cancelled,
  Start again.

The notice is a fragment that refreshes itself every 2 s while a job is queued or running (or an
estimate is being measured) and reruns the page when the job's state changes or the features
become complete.

**Estimates.** Once per (model, data, settings) (the features' content key), a small process
``python -m dtrak_app.feature_jobs probe`` featurizes training images with the model and
settings of the job: a batch of 1, a batch of 2 (peak memory, ``ru_maxrss`` of the fresh
process, after each), and the batch of 2 again, timed (the first run of a batch size is several
times slower: it maps its memory). With min(K, timestep_chunk) timesteps per image (the
featurizer evaluates at most ``timestep_chunk`` timesteps of a sample together, so memory does
not grow beyond it, and time grows linearly in K):

    seconds per image ~ (time of the warm 2-image batch / 2) * K / K_probe
    peak memory       ~ peak(batch 1) + (B - 1) * (peak(batch 2) - peak(batch 1)) + n k 4 bytes

with B = min(batch size, n) the job's batch and n k 4 bytes the feature store it writes. On
emoji3-demo (K = 10, k = 2048, B = 16) the probe said 6.0 GB where the job peaked at 4.9 GB: the
memory estimate errs on the safe side. Times are measured now, on this machine: they include
whatever else is running. The result goes to ``<cache>/estimates/<features key>.json`` (atomic,
checksummed); the probe runs in the background (the page does not wait for it), one at a time
per cache.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import streamlit as st

from dtrak_app import common as c
from dtrak_app.text import md_escape
from dtrak_core import jobs
from dtrak_core.attribution.dataset_features import FeatureStatus, feature_status
from dtrak_core.attribution.featurizer import Featurizer, FeatureSettings
from dtrak_core.attribution.methods import METHODS, Method
from dtrak_core.io import sha256_json, try_lock, write_json_atomic
from dtrak_core.paths import REPO_ROOT

#: How often the notice refreshes while something is in progress (seconds).
REFRESH_SECONDS = 2.0
#: Training images the probe featurizes (a batch of 1, then a timed batch of 2).
PROBE_IMAGES = 2
ESTIMATES_DIR = "estimates"
#: One probe at a time per cache: concurrent probes would time each other.
PROBE_LOCK = ".probe.lock"
#: A probe that has not answered within this many seconds is started again (it was killed).
PROBE_RETRY_SECONDS = 300.0
ESTIMATE_VERSION = 1


# ----------------------------------------------------------------------------- jobs

def jobs_root() -> Path:
    return c.cache_root() / "jobs"


def featurize_args(ctx: c.Context, settings: FeatureSettings) -> list[str]:
    """The CLI job that computes the training features the app will look for."""
    args = ["featurize", "--model", ctx.entry.model_dir, "--training-set", "--output-fn", settings.output_fn,
            "-K", str(settings.num_timesteps), "-k", str(settings.projection_dim),
            "--cache-dir", str(c.cache_root() / "features")]
    if ctx.entry.data_dir:
        args += ["--data", ctx.entry.data_dir]
    return args


def job_description(ctx: c.Context, settings: FeatureSettings) -> str:
    return (f"training features of {ctx.entry.name} ({settings.output_fn}, K={settings.num_timesteps}, "
            f"k={settings.projection_dim})")


def start_features(ctx: c.Context, settings: FeatureSettings, features_key: str) -> jobs.Job:
    """Submit (or find) the background job computing the training features: called only when the
    user presses Start.

    The job's identity is the feature key (model weights, training set, settings), so a model
    retrained in place gets a new job; a "done" job whose features are missing runs again.
    """
    return jobs.submit(featurize_args(ctx, settings), job_description(ctx, settings), jobs_root(),
                       identity=features_key, rerun_done=True)


def find_features_job(ctx: c.Context, settings: FeatureSettings, features_key: str) -> jobs.Job | None:
    return jobs.find_job(featurize_args(ctx, settings), jobs_root(), identity=features_key)


@dataclass(frozen=True)
class Pending:
    """Training features a method needs that the store does not hold (complete) yet."""

    settings: FeatureSettings
    status: FeatureStatus


def features_pending(ctx: c.Context, method: Method, K: int, k: int) -> Pending | None:
    """None when the method's training features are ready (or it needs none); else what is missing.

    Starts nothing: :func:`wait_for_features` offers the Start button.
    """
    if not method.needs_features:
        return None
    settings = c.feature_settings(method, K, k)
    try:
        status = feature_status(ctx.model, ctx.train, settings, c.cache_root() / "features")
    except ValueError as error:
        st.error(md_escape(error))
        return None
    return None if status.state == "complete" else Pending(settings, status)


# ----------------------------------------------------------------------------- estimates

@dataclass(frozen=True)
class Estimate:
    """What the probe measured, and what it predicts for the whole job.

    Attributes:
        seconds_per_image: predicted featurization time of one image at the job's settings.
        peak_bytes: predicted peak resident memory of the job.
        probe_images, probe_timesteps: what the probe featurized (images, timesteps per image).
        measured: when (UNIX time). error: why there is no estimate ("" when there is one).
    """

    seconds_per_image: float = 0.0
    peak_bytes: int = 0
    probe_images: int = 0
    probe_timesteps: int = 0
    measured: float = 0.0
    error: str = ""


def estimate_path(features_key: str) -> Path:
    return c.cache_root() / ESTIMATES_DIR / f"{features_key}.json"


def read_estimate(features_key: str) -> Estimate | None:
    """The stored estimate of these features, or None when absent, torn or of another version."""
    return read_estimate_at(estimate_path(features_key))


def read_estimate_at(path: Path) -> Estimate | None:
    try:
        stored = json.loads(path.read_text())
        record = {k: v for k, v in stored.items() if k != "sha256"}
        if stored.get("sha256") != sha256_json(record) or record.get("version") != ESTIMATE_VERSION:
            return None
        return Estimate(**record["estimate"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_estimate(path: Path, estimate: Estimate) -> None:
    record = {"estimate": asdict(estimate), "version": ESTIMATE_VERSION}
    write_json_atomic(path, {**record, "sha256": sha256_json(record)})


def probe_args(ctx: c.Context, settings: FeatureSettings, out: Path) -> list[str]:
    args = [sys.executable, "-m", "dtrak_app.feature_jobs", "probe", "--model", ctx.entry.model_dir,
            "--output-fn", settings.output_fn, "-K", str(settings.num_timesteps), "-k", str(settings.projection_dim),
            "--out", str(out)]
    return args + (["--data", ctx.entry.data_dir] if ctx.entry.data_dir else [])


def request_estimate(ctx: c.Context, settings: FeatureSettings, features_key: str) -> Estimate | None:
    """The stored estimate; when there is none, start the probe that measures it (unless one is
    already measuring these features) and return None."""
    estimate = read_estimate(features_key)
    if estimate is not None:
        return estimate
    out = estimate_path(features_key)
    started = out.with_suffix(".started")
    with try_lock(out.with_suffix(".lock")) as free:
        if not free:
            return None  # a probe of these features is measuring now
    try:
        if time.time() - started.stat().st_mtime < PROBE_RETRY_SECONDS:
            return None  # started a moment ago (it may still be waiting for the probe lock)
    except FileNotFoundError:
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    started.touch()
    with open(out.with_suffix(".log"), "wb") as log:
        # The job's own environment (threads included), so the probe times what the job will do.
        subprocess.Popen(probe_args(ctx, settings, out), cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    return None


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(model_dir: str, data_dir: str | None, settings: FeatureSettings) -> Estimate:
    """Featurize 1, then 2 training images in this (fresh) process; the estimate for the whole
    training set (formulas in the module docstring)."""
    from dtrak_core.attribution.loading import load_model, load_training_set
    from dtrak_core.tasks import Batch

    model = load_model(model_dir)
    train = load_training_set(model, data_dir)
    n = len(train)
    probe_timesteps = min(settings.num_timesteps, settings.timestep_chunk)
    probe = replace(settings, num_timesteps=probe_timesteps)
    featurizer = Featurizer.create(model.task, probe)
    images = train.to_tensor()[:PROBE_IMAGES]
    captions = model.task.captions_for(train)

    def batch(size: int) -> Batch:
        return Batch(images[:size], list(range(size)), None if captions is None else list(captions[:size]))

    featurizer.featurize(batch(1))  # also the one-off costs (first vmap, projection set-up)
    peak_one = _max_rss_bytes()
    size = min(PROBE_IMAGES, n)
    featurizer.featurize(batch(size))  # the memory of one more sample (its first run also maps it: slow)
    per_sample = max(_max_rss_bytes() - peak_one, 0)
    start = time.perf_counter()
    featurizer.featurize(batch(size))  # timed warm, as the job's batches after its first are
    seconds = time.perf_counter() - start
    job_batch = min(settings.batch_size, n)
    peak = peak_one + (job_batch - 1) * per_sample + n * settings.projection_dim * 4
    return Estimate(seconds / size * settings.num_timesteps / probe_timesteps, int(peak), size, probe_timesteps,
                    time.time())


def run_probe(argv: list[str]) -> int:
    """``python -m dtrak_app.feature_jobs probe ...``: measure and store one estimate."""
    parser = argparse.ArgumentParser(prog="python -m dtrak_app.feature_jobs probe")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--output-fn", required=True)
    parser.add_argument("-K", type=int, required=True)
    parser.add_argument("-k", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from dtrak_core.io import hold_lock

    with try_lock(args.out.with_suffix(".lock")) as mine:
        if not mine:
            return 0  # another probe measures these features
        with hold_lock(args.out.parent / PROBE_LOCK):
            if read_estimate_at(args.out) is not None:
                return 0
            settings = FeatureSettings(output_fn=args.output_fn, num_timesteps=args.K, projection_dim=args.k)
            try:
                estimate = measure(args.model, args.data, settings)
            except Exception as error:  # noqa: BLE001 (any failure is reported to the page, in one line)
                estimate = Estimate(error=f"{type(error).__name__}: {error}".splitlines()[0][:300])
            write_estimate(args.out, estimate)
    print(json.dumps(asdict(estimate)))
    return 0


# ----------------------------------------------------------------------------- the notice

def format_bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count / 1e3:.0f} kB"


def describe_work(status: FeatureStatus, estimate: Estimate | None) -> str:
    """One sentence: the images to featurize, and the time and memory estimate (or why there is none)."""
    todo = status.rows - status.rows_done
    images = f"{status.rows} training images" if status.rows_done == 0 else \
        f"{todo} of {status.rows} training images ({status.rows_done} are stored)"
    if estimate is None:
        return f"To compute: {images} (timing {PROBE_IMAGES} of them on this model to estimate time and memory...)."
    if estimate.error:
        return f"To compute: {images} (no estimate: {md_escape(estimate.error)})."
    return (f"To compute: {images}, about {c.format_seconds(todo * estimate.seconds_per_image)} on this machine "
            f"now and {format_bytes(estimate.peak_bytes)} of memory at the peak (measured by featurizing "
            f"{estimate.probe_images} of them).")


def queue_ahead(root: Path) -> str:
    active = [j for j in jobs.list_jobs(root) if j.active]
    if not active:
        return ""
    return f" It would wait behind {len(active)} job{'s' if len(active) > 1 else ''} (one runs at a time; see Jobs)."


def wait_for_features(ctx: c.Context, pending: Pending, method_name: str, K: int, k: int, place: str = "",
                      fallback: str | None = "raw pixel similarity") -> None:
    """What the method's training features need, with Start / Cancel / Start again, refreshed
    every 2 s while something runs; the page reruns when the features are complete.

    ``place`` tells apart the buttons of several notices on one page; ``fallback`` names what
    the page shows meanwhile (None: nothing).
    """
    label = md_escape(METHODS[method_name].label)
    settings, key = pending.settings, pending.status.key
    what = f"{label} (K={K}, k={k})"
    meanwhile = f" Meanwhile: {fallback}." if fallback else ""
    first = find_features_job(ctx, settings, key)
    first_state = None if first is None else first.state
    estimating = (first is None or not first.active) and read_estimate(key) is None

    @st.fragment(run_every=REFRESH_SECONDS if (first is not None and first.active) or estimating else None)
    def notice() -> None:
        status = feature_status(ctx.model, ctx.train, settings, c.cache_root() / "features")
        job = find_features_job(ctx, settings, key)
        if status.state == "complete" or (None if job is None else job.state) != first_state:
            st.rerun(scope="app")  # the features arrived, or the job moved on: redraw the page
        if job is not None and job.active:
            position = jobs.queue_position(job, jobs_root())
            if position is not None:
                st.info(f"The training features for {what} are queued: position {position} "
                        f"(jobs run one at a time; see Jobs).{meanwhile}")
            else:
                st.info(f"The training features for {what} are being computed (see Jobs).{meanwhile}")
            c.show_job(job, jobs_root())
            if st.button("Cancel", key=f"cancel_{place}{job.key}"):
                jobs.cancel(job.key, jobs_root())
                st.rerun(scope="app")
            return
        estimate = request_estimate(ctx, settings, key)
        if estimating and estimate is not None:
            st.rerun(scope="app")  # measured: redraw without the 2-s refresh
        if job is not None and job.state == "failed":
            st.error(f"Computing the training features for {what} failed: {md_escape(job.message)}.{meanwhile}")
            st.code(job.log_tail(5) or "(no output)")
        elif job is not None and job.state == "cancelled":
            st.warning(f"Computing the training features for {what} was cancelled.{meanwhile}")
        else:
            st.info(f"The training features for {what} are not ready yet.{meanwhile}")
        st.markdown(describe_work(status, estimate) + queue_ahead(jobs_root()))
        again = job is not None and job.state in ("failed", "cancelled")
        if st.button("Start again" if again else "Start computing", key=f"start_{place}{key}", type="primary"):
            start_features(ctx, settings, key)
            st.rerun(scope="app")  # the notice then shows the job's place in the queue

    notice()


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "probe":
        sys.exit("usage: python -m dtrak_app.feature_jobs probe --model DIR [--data DIR] --output-fn F -K K -k k --out FILE")
    raise SystemExit(run_probe(sys.argv[2:]))
