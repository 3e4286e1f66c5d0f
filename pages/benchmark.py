"""Benchmark: the LDS of every method, with CIs, and for one target its datamodel scatter.

Reads a stored LDS build (``benchmarks/lds/emoji3-mini`` or ``DTRAK_LDS_DIR``): the results of
``python -m dtrak_core lds score`` (verified against their checksums) and the measured subset
outputs. Nothing is computed here beyond a Spearman correlation, so the page loads instantly.
The page names the model the build measured, and shows its tables whole (static tables, no scrolling).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dtrak_app import common as c
from dtrak_app.text import md_escape, plotly_text
from dtrak_core import registry
from dtrak_core.evaluation.lds.config import TARGET_KINDS, read_build
from dtrak_core.evaluation.lds.outputs import load_outputs
from dtrak_core.evaluation.lds.report import PAPER_LDS
from dtrak_core.evaluation.lds.scores import (DEFAULT_GRID, PREDICTIONS_FILE, RESULTS_FILE, read_results,
                                              results_match_targets)
from dtrak_core.evaluation.lds.targets import Targets
from dtrak_core.evaluation.metrics import spearman
from dtrak_core.models import pipeline_files_hash
from dtrak_core.paths import REPO_ROOT

c.require_access()  # first: a page may run without app.py (see require_access)

KIND_LABELS = {"validation": "held-out validation images", "generated": "generated images"}


def build_dir() -> Path:
    return Path(os.environ.get("DTRAK_LDS_DIR", REPO_ROOT / "benchmarks" / "lds" / "emoji3-mini"))


@st.cache_data(max_entries=8)
def load(folder: str, stamp: float) -> tuple[dict, dict[str, np.ndarray]]:
    """Results and predictions of a build, both verified (``read_results``: the predictions file
    against the checksum the results hold); ``stamp`` (the results file's mtime) renews the cache."""
    results = read_results(folder)
    with np.load(Path(folder) / "results" / PREDICTIONS_FILE) as data:
        predictions = {key: np.asarray(data[key]) for key in data.files}
    return results, predictions


@st.cache_data(max_entries=32)
def _files_hash(model_dir: str, stamp: float) -> str | None:
    try:
        return pipeline_files_hash(model_dir)
    except (OSError, ValueError):
        return None


def model_name(build: dict) -> str:
    """What the build measured, in words: the registered model with its weights (by files hash),
    else the folder it records; with the first characters of the hash."""
    wanted = str(build.get("model_hash", ""))
    for entry in registry.list_models(c.cache_root()):
        index = Path(entry.model_dir) / "model_index.json"
        if index.exists() and _files_hash(entry.model_dir, index.stat().st_mtime) == wanted:
            return f"{entry.name} (weights {wanted[:10]})"
    return f"the model in {build.get('model_dir', '?')} (weights {wanted[:10]}; not registered here)"


@st.cache_data(max_entries=8)
def report_losses(folder: str, stamp: float) -> tuple[np.ndarray, list[str]]:
    """Measured losses (M, T) of the reported subsets (averaged over seeds) and their names."""
    outputs = load_outputs(folder, "report")
    return outputs.losses, outputs.subset_names


def table(results: dict) -> pd.DataFrame:
    rows = []
    for entry in DEFAULT_GRID:
        record = results["entries"].get(entry.name, {})
        row = {"method": entry.label}
        for kind in TARGET_KINDS:
            r = record.get("kinds", {}).get(kind, {})
            measured = r.get("status") == "measured"
            row[f"LDS % ({kind})"] = round(100 * r["mean"], 1) if measured else None
            row[f"95% CI ({kind})"] = (f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]" if measured
                                       else "pending")
        # an en dash, not "-": st.table renders cells as Markdown, where "- " starts a list
        row["paper val / gen (CIFAR-2)"] = " / ".join(x or "–" for x in PAPER_LDS.get(entry.name, (None, None)))
        rows.append(row)
    return pd.DataFrame(rows)


def ordering_table(checks: list[dict]) -> pd.DataFrame:
    """One row per claim of the paper's ordering: the paired difference and verdict per target kind."""
    rows = []
    for check in checks:
        row = {"claim": check["claim"]}
        for kind in TARGET_KINDS:
            r = check[kind]
            row[f"difference, points ({kind})"] = round(100 * r["difference"], 1) if "difference" in r else None
            row[f"95% CI ({kind})"] = (f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]"
                                       if "difference" in r else "")
            row[f"verdict ({kind})"] = r["verdict"]
        rows.append(row)
    return pd.DataFrame(rows)


def bar_chart(results: dict) -> go.Figure:
    figure = go.Figure()
    for kind in TARGET_KINDS:
        labels, means, high, low = [], [], [], []
        for entry in DEFAULT_GRID:
            r = results["entries"].get(entry.name, {}).get("kinds", {}).get(kind, {})
            if r.get("status") != "measured":
                continue
            labels.append(entry.label)
            means.append(100 * r["mean"])
            high.append(100 * (r["ci_high"] - r["mean"]))
            low.append(100 * (r["mean"] - r["ci_low"]))
        figure.add_trace(go.Bar(name=KIND_LABELS[kind], y=labels, x=means, orientation="h",
                                error_x=dict(type="data", symmetric=False, array=high, arrayminus=low)))
    # Horizontal bars: the method names are long, and read best as row labels in the table's order.
    rows = len({label for trace in figure.data for label in trace.y})
    figure.update_layout(barmode="group", xaxis_title="LDS (%)", height=120 + 44 * rows,
                         margin=dict(l=10, r=10, t=40, b=10), yaxis=dict(autorange="reversed", automargin=True),
                         legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="left", x=0))
    return figure


st.title("Benchmark")
folder = build_dir()
st.caption("Linear Datamodeling Score: retrain on many random halves of the training set, measure each model's "
           "loss on a target, and ask how well the sum of a method's scores over each half predicts it "
           "(Spearman correlation over the halves; higher is better, random = 0).")
results_path = folder / "results" / RESULTS_FILE
if not results_path.exists():
    st.info(f"No LDS results in {md_escape(folder)} yet. Build and score them with `python -m dtrak_core lds build`, "
            "`lds attribute` and `lds score` (see docs/benchmarks/lds.md).")
    st.stop()
try:
    build = read_build(folder)
    results, predictions = load(str(folder), results_path.stat().st_mtime)
except (OSError, ValueError) as error:  # a damaged or half-written build: say which file, never show it
    st.error(md_escape(error))
    st.stop()
st.subheader(f"Model: {md_escape(model_name(build))}")
st.caption(f"LDS build {md_escape(folder.name)} ({md_escape(folder)}).")
progress = results["progress"]
report = progress["report"]
done = report["models_done"] == report["models_total"] and progress["tune"]["models_done"] == progress["tune"]["models_total"]
(st.success if done else st.warning)(
    f"{'Complete' if done else 'Partial'}: {report['subsets_with_any_seed']} of {report['subsets']} reported subsets "
    f"measured ({report['models_done']} of {report['models_total']} models), "
    f"{progress['tune']['subsets_with_any_seed']} of {progress['tune']['subsets']} tuning subsets.")
# Static tables: every row and column whole, text wrapped (a dataframe scrolled and cut them).
st.table(table(results).style.format(precision=1, na_rep="–"), hide_index=True)
st.plotly_chart(bar_chart(results), width="stretch")
if results.get("ordering"):
    st.subheader("The paper's ordering, checked")
    st.caption("Each claim compares two methods on the same targets and subsets: the LDS difference in points with a "
               "95% paired bootstrap CI over subsets. 'holds' means the whole CI is above 0.")
    st.table(ordering_table(results["ordering"]).style.format(precision=1, na_rep="–"), hide_index=True)

st.subheader("One target: predicted vs actual")
measured = [e for e in DEFAULT_GRID
            if any(r.get("status") == "measured" for r in results["entries"].get(e.name, {}).get("kinds", {}).values())]
if not measured:
    st.info("No method has an LDS yet.")
    st.stop()
names = [e.name for e in measured]
if "lds_method" not in st.session_state:
    linked = st.query_params.get("lds_method")
    st.session_state["lds_method"] = linked if linked in names else names[0]
if "lds_kind" not in st.session_state:
    linked = st.query_params.get("lds_kind")
    st.session_state["lds_kind"] = linked if linked in TARGET_KINDS else TARGET_KINDS[0]
targets = Targets.load(folder / "targets")
all_losses, all_names = report_losses(str(folder), results_path.stat().st_mtime)
# The subsets the results were scored on (more may have been measured since).
subset_names = results["report_subsets"]
if not results_match_targets(results, targets):
    st.warning(f"Targets were added to this build after these results were scored (it has {len(targets)} "
               "targets now). The tables above are the earlier results; the per-target view returns once "
               "`lds build`, `lds attribute` and `lds score` have run again.")
    st.stop()
if not set(subset_names) <= set(all_names):
    st.warning("Some subsets these results were scored on have no complete measured outputs now (is `lds build` "
               "measuring them on new targets?); the per-target view returns once it has finished.")
    st.stop()
cols = st.columns(3)
name = cols[0].selectbox("Method", names, key="lds_method", format_func=lambda n: next(e.label for e in measured
                                                                                         if e.name == n))
kind = cols[1].selectbox("Targets", list(TARGET_KINDS), key="lds_kind", format_func=KIND_LABELS.get)
rows = targets.indices(kind)
key = f"{name}/{kind}"
if key not in predictions or len(rows) == 0:
    st.info(f"No LDS of this method on {KIND_LABELS[kind]} yet.")
    st.stop()
if "lds_target" not in st.session_state:
    try:
        st.session_state["lds_target"] = min(max(0, int(st.query_params.get("lds_target", 0))), len(rows) - 1)
    except ValueError:
        st.session_state["lds_target"] = 0
index = int(cols[2].number_input(f"Target (0..{len(rows) - 1})", min_value=0, max_value=len(rows) - 1, step=1,
                                 key="lds_target"))
c.sync_url(lds_method=name, lds_kind=kind, lds_target=index)

losses = all_losses[[all_names.index(name) for name in subset_names]]
predicted = predictions[key][index]
actual = -losses[:, rows[index]]
rho = float(spearman(predicted, actual))
left, right = st.columns([1, 3])
left.image(c.pixel_image_url(targets.images[rows[index]], 128), caption=md_escape(targets.names[rows[index]]))
left.metric("LDS of this target", "undefined" if np.isnan(rho) else f"{rho:.3f}")
scatter = go.Figure(go.Scatter(x=predicted, y=actual, mode="markers", text=[plotly_text(s) for s in subset_names],
                               marker=dict(size=7, opacity=0.7)))
scatter.update_layout(xaxis_title="predicted: sum of scores over the subset",
                      yaxis_title="actual: minus the subset model's loss", height=420,
                      margin=dict(l=10, r=10, t=30, b=10), title=f"Spearman {rho:.3f} over {len(actual)} subsets")
right.plotly_chart(scatter, width="stretch")
