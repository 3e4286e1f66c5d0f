"""Counterfactual: remove what a method blames for a generated image, retrain, and look again.

Stored results (``benchmarks/counterfactual/<model>/``, or ``DTRAK_COUNTERFACTUAL_DIR``) load
instantly; a new experiment (one retrain, minutes on a CPU) runs as a background job through
``dtrak_core.jobs``, so it survives reloads and is never started twice.

The page opens on a model that has stored experiments (unless a link names the model), lists only
records that pass their checksums, and opens a record's images only inside its results folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from dtrak_app import common as c
from dtrak_app.text import md_escape
from dtrak_core import jobs, registry
from dtrak_core.evaluation.counterfactual import (DEFAULT_FRACTION, CounterfactualConfig, difference_cell,
                                                  load_results, paired_comparisons, resolve_k, stored_result,
                                                  summarize)
from dtrak_core.models import pipeline_files_hash
from dtrak_core.paths import REPO_ROOT

c.require_access()  # first: a page may run without app.py (see require_access)

REMOVALS = {"dtrak": "D-TRAK top-k proponents", "trak": "TRAK top-k proponents", "random": "k random images"}


def results_dir(model_dir: str) -> Path:
    """Where this model's counterfactual records live (the CLI's default, or the environment's)."""
    root = os.environ.get("DTRAK_COUNTERFACTUAL_DIR")
    return Path(root) if root else REPO_ROOT / "benchmarks" / "counterfactual" / Path(model_dir).resolve().name


def job_args(config: CounterfactualConfig) -> list[str]:
    args = ["counterfactual", "--model", config.model_dir, "--target-seed", str(config.target_seed),
            "--method", config.method, "--results", config.results_dir,
            "--models-dir", str(c.cache_root() / "counterfactual" / "models"), "--no-progress"]
    return args + (["--k", str(config.k)] if config.k is not None else [])


def removal_label(method: str, markdown: bool = False) -> str:
    """A removal in words; ``markdown``: with the artist's name escaped (labels, captions, buttons)."""
    if method in REMOVALS:
        return REMOVALS[method]
    artist = method[len("artist:"):]
    return f"every image by {md_escape(artist) if markdown else artist}"


@st.cache_data(max_entries=32)
def has_records(folder: str, model_dir: str, stamp: float) -> bool:
    """Whether ``folder`` holds a record of the model in ``model_dir`` (by its files hash; a quick
    look at the records' model_hash, not a verification); ``stamp`` renews the cache."""
    try:
        wanted = pipeline_files_hash(model_dir)
    except (OSError, ValueError):
        return False
    for path in sorted(Path(folder).glob("seed-*/*.json")):
        try:
            if json.loads(path.read_text()).get("model_hash") == wanted:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def open_on_a_model_with_results() -> None:
    """On the page's first visit in a session, switch to the first model with stored experiments
    when the model in view has none (a link that names its model is obeyed)."""
    c.init_state()
    if st.session_state.get("_cf_opened"):
        return
    st.session_state["_cf_opened"] = True
    if st.session_state.get("_model_from_link"):
        return
    try:
        entries = registry.list_models(c.cache_root())
    except ValueError:
        return  # model_context says what is wrong with the registry

    def stored(entry: registry.ModelEntry) -> bool:
        folder = results_dir(entry.model_dir)
        return folder.is_dir() and has_records(str(folder), entry.model_dir, folder.stat().st_mtime)

    current = next((e for e in entries if e.name == st.session_state.get("model")), entries[0] if entries else None)
    if current is None or stored(current):
        return
    chosen = next((e for e in entries if stored(e)), None)
    if chosen is not None:
        st.session_state["model"] = chosen.name
        st.session_state["_cf_switched"] = (current.name, chosen.name)


def record_image(record: dict, name: str, root: Path) -> np.ndarray | None:
    """The record's image ``name`` ("before_png"/"after_png"), opened only when it lies inside the
    results folder ``root`` (a record names its images; a rewritten one could name any file)."""
    path = (Path(record["folder"]) / str(record[name])).resolve()
    if not path.is_relative_to(root.resolve()):
        return None
    return np.asarray(Image.open(path).convert("RGB"))


def show_record(record: dict, title: str, root: Path) -> None:
    """Before / after images and the two metrics of one stored experiment (``title``: Markdown),
    its images read from inside ``root`` only."""
    st.markdown(f"**{title}**")
    cols = st.columns(2)
    for column, name, caption in ((cols[0], "before_png", "before (full training set)"),
                                  (cols[1], "after_png", f"after removing {record['k']} images")):
        image = record_image(record, name, root)
        if image is None:
            column.warning(f"Not shown: the record names {md_escape(record[name])}, outside its results folder "
                           f"{md_escape(root)}.")
        else:
            column.image(c.pixel_image_url(image, 160), caption=caption)
    has_cosine = "embedding_cosine" in record
    metrics = st.columns(3 if has_cosine else 2)
    metrics[0].metric("pixel L2 (higher = bigger change)", f"{record['pixel_l2']:.3f}")
    metrics[1].metric("SSIM (lower = bigger change)", f"{record['ssim']:.3f}")
    if has_cosine:
        metrics[2].metric("embedding cosine (lower = bigger change)", f"{record['embedding_cosine']:.3f}",
                          help=f"embedding model {md_escape(record['embedding_model'])}")
    shares = ", ".join(f"{md_escape(artist)}: {count}" for artist, count in sorted(record["removed_by_artist"].items()))
    st.caption(f"removed by artist: {shares}; retrained {record['retrain_steps']} steps")


@st.fragment(run_every=2.0)
def watch(key: str) -> None:
    """A running experiment's progress, refreshed every 2 s; the whole page reruns when it ends."""
    job = jobs.get_job(key, c.cache_root() / "jobs")
    if job is None:
        return
    c.show_job(job)
    if not job.active:
        st.rerun()


def run_or_progress(config: CounterfactualConfig, label: str, label_md: str) -> None:
    """The job of an experiment without a stored result: its progress, or a button to start it
    (``label``: plain words for the job's description; ``label_md``: the same as Markdown)."""
    args = job_args(config)
    job = jobs.find_job(args, c.cache_root() / "jobs")
    if job is not None and job.active:
        watch(job.key)
        return
    if job is not None and job.state == "failed":
        c.show_job(job)
    if st.button(f"Run: {label_md}", key=f"run_{config.tag}_{config.target_seed}"):
        jobs.submit(args, f"counterfactual seed {config.target_seed}, {label}", c.cache_root() / "jobs",
                    rerun_done=True)  # shown only while no result is stored: a done job lost it
        st.rerun()


st.title("Counterfactual check")
st.caption("Remove the training images a method blames for a generated image, retrain from scratch with the same "
           "recipe and seed, regenerate from the same seed (DDIM 50 steps, eta 0), and see what changed. A good "
           "attribution changes the image more than removing as many random images.")
open_on_a_model_with_results()
ctx = c.model_context()
if ctx is None:
    st.stop()
switched = st.session_state.pop("_cf_switched", None)  # said once, on the visit that switched
if switched and switched[1] == ctx.entry.name:
    st.info(f"Showing {md_escape(switched[1])}, the model with stored experiments ({md_escape(switched[0])} has "
            "none yet); pick another model in the sidebar.")

n = len(ctx.train)
artists = sorted(set(ctx.train.labels or []))
choices = list(REMOVALS) + [f"artist:{a}" for a in artists]
if "cf_method" not in st.session_state:
    linked = st.query_params.get("cf_method", "dtrak")
    st.session_state["cf_method"] = linked if linked in choices else "dtrak"
if "cf_k" not in st.session_state:
    try:
        st.session_state["cf_k"] = resolve_k(int(st.query_params["cf_k"]) if "cf_k" in st.query_params else None, n)
    except ValueError:
        st.warning(f"Ignoring the link's cf_k: expected a number of images between 1 and {n - 1}.")
        st.session_state["cf_k"] = resolve_k(None, n)

cols = st.columns(3)
cols[0].number_input("Target seed", min_value=0, max_value=2**31 - 1, step=1, key="seed")
method = cols[1].selectbox("Remove", choices, key="cf_method",
                           format_func=removal_label)
k = int(cols[2].number_input(f"k (default {DEFAULT_FRACTION:.0%} of {n})", min_value=1, max_value=n - 1, step=1,
                             key="cf_k", disabled=method.startswith("artist:")))
seed = int(st.session_state["seed"])
c.sync_url(cf_method=method, cf_k=k)

folder = results_dir(ctx.entry.model_dir)
config = CounterfactualConfig(ctx.entry.model_dir, seed, method, None if method.startswith("artist:") else k,
                              results_dir=str(folder))
baseline = CounterfactualConfig(ctx.entry.model_dir, seed, "random", k if not method.startswith("artist:") else
                                len([a for a in (ctx.train.labels or []) if a == method[len("artist:"):]]),
                                results_dir=str(folder))

label, label_md = removal_label(method), removal_label(method, markdown=True)
left, right = st.columns(2)
with left:
    record = stored_result(config, n, ctx.files_hash)
    if record is not None:
        show_record(record, label_md, folder)
    else:
        st.markdown(f"**{label_md}**")
        st.image(c.pixel_image_url(c.samples(ctx.entry.model_dir, ctx.files_hash, (seed,))[0], 160),
                 caption=f"seed {seed} (before); no stored result for this removal yet")
        run_or_progress(config, label, label_md)
with right:
    if method == "random":
        st.info("This is the random baseline itself; pick D-TRAK or TRAK to compare with it.")
    else:
        base = stored_result(baseline, n, ctx.files_hash)
        if base is not None:
            show_record(base, f"baseline: {base['k']} random images", folder)
            if record is not None:
                delta = record["pixel_l2"] - base["pixel_l2"]
                st.caption(f"{label_md} changed the image {'more' if delta > 0 else 'less'} than the random baseline "
                           f"(L2 {record['pixel_l2']:.3f} vs {base['pixel_l2']:.3f}).")
        else:
            st.markdown(f"**baseline: {baseline.k} random images**")
            st.caption("No stored baseline for this seed and k yet.")
            run_or_progress(baseline, f"{baseline.k} random images", f"{baseline.k} random images")

records = [r for r in load_results(folder, skip_corrupt=True) if r.get("model_hash") == ctx.files_hash]
st.subheader("All stored experiments of this model")
if records:
    summary = pd.DataFrame(summarize(records)).drop(columns=["method"])
    st.dataframe(summary.rename(columns={
        "l2_mean": "L2 mean", "l2_median": "L2 median", "ssim_mean": "SSIM mean", "ssim_median": "SSIM median",
        "embedding_model": "embedding model", "cos_mean": "embedding cos mean", "cos_median": "embedding cos median"}),
        hide_index=True)
    paired = paired_comparisons(records)
    if paired:
        st.markdown("**Paired by target** (same targets, same k): each method against random removal, and D-TRAK "
                    "against TRAK. Differences with a 95% bootstrap CI over targets.")
        st.dataframe(pd.DataFrame([{
            "removal": row["method"], "against": row["baseline"], "targets": row["targets"],
            "L2 ratio": round(row["l2_ratio"], 2),
            "paper L2 ratio": None if row["paper_l2_ratio"] is None else round(row["paper_l2_ratio"], 2),
            "L2 difference": difference_cell(row["l2_difference"], row["l2_ci"]),
            "SSIM difference": difference_cell(row["ssim_difference"], row["ssim_ci"]),
            "changed more": f"{row['share_changed_more']:.0%}"} for row in paired]), hide_index=True)
    st.caption(f"from {md_escape(folder)}; the command line's batch mode adds more "
               "(`python -m dtrak_core counterfactual --target-seed 0-59 --method dtrak trak random`).")
else:
    st.caption(f"None yet in {md_escape(folder)}.")
