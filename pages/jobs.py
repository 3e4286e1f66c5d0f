"""Jobs: long work running in the background (training features, ...)."""

from __future__ import annotations

import datetime as dt

import streamlit as st

from dtrak_app import common as c
from dtrak_app.text import md_escape
from dtrak_core import jobs
from dtrak_core.attribution.methods import APP_METHODS, METHODS
from dtrak_core.attribution.dataset_features import feature_status

c.require_access()  # first: a page may run without app.py (see require_access)

st.title("Jobs")
st.caption("Long work runs as separate processes: it keeps going when you reload or leave the page, "
           "and the same work never runs twice.")
root = c.cache_root() / "jobs"
ctx = c.model_context()
if ctx is not None:
    with st.form("start"):
        st.write(f"Compute training features of **{md_escape(ctx.entry.name)}**")
        cols = st.columns(3)
        method_name = cols[0].selectbox("Method", [m for m in APP_METHODS if METHODS[m].needs_features],
                                        format_func=lambda m: METHODS[m].label, key="job_method")
        cols[1].number_input("K timesteps", min_value=1, max_value=1000, step=1, key="K")
        cols[2].selectbox("Projection size k", sorted(set(c.k_OPTIONS) | {int(st.session_state["k"])}), key="k")
        if st.form_submit_button("Start"):
            settings = c.feature_settings(METHODS[method_name], int(st.session_state["K"]), int(st.session_state["k"]))
            status = feature_status(ctx.model, ctx.train, settings, c.cache_root() / "features")
            if status.state == "complete":
                st.success("These features are already computed.")
            else:
                c.start_features(ctx, settings, status.key)


@st.fragment(run_every=2.0)
def job_list() -> None:
    listed = jobs.list_jobs(root)
    if not listed:
        st.info("No jobs yet.")
        return
    for job in listed:
        with st.container(border=True):
            when = dt.datetime.fromtimestamp(job.submitted or 0).strftime("%Y-%m-%d %H:%M:%S")
            st.markdown(f"**{md_escape(job.description or ' '.join(job.args))}** · submitted {when} · `{job.key}`")
            c.show_job(job)
            if job.active and st.button("Cancel", key=f"cancel_{job.key}"):
                jobs.cancel(job.key, root)
                st.rerun()
            with st.expander("Command and log"):
                st.code("python -m dtrak_core " + " ".join(job.args), language="bash")
                st.code(job.log_tail(30) or "(no output yet)")


job_list()
