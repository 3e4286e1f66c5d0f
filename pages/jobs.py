"""Jobs: the machine's queue of long work (training features, counterfactual retrains, ...)."""

from __future__ import annotations

import datetime as dt

import streamlit as st

from dtrak_app import common as c
from dtrak_app import feature_jobs
from dtrak_app.text import md_escape
from dtrak_core import jobs
from dtrak_core.attribution.methods import APP_METHODS, METHODS
from dtrak_core.attribution.dataset_features import feature_status

c.require_access()  # first: a page may run without app.py (see require_access)

st.title("Jobs")
st.caption(f"Long work runs as separate processes, {jobs.job_slots()} at a time on this machine "
           f"(`{jobs.SLOTS_VARIABLE}`), the others wait in the queue in the order they were started. A job keeps "
           "going when you reload or leave the page, and the same work never runs twice.")
root = feature_jobs.jobs_root()
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
                job = feature_jobs.start_features(ctx, settings, status.key)
                position = jobs.queue_position(job, root)
                st.success(f"Started: {md_escape(job.description)}" + (f", position {position} in the queue."
                                                                       if position else "."))


def job_row(job: jobs.Job) -> None:
    """One job: what, when, its state and progress, and what can be done with it."""
    with st.container(border=True):
        when = dt.datetime.fromtimestamp(job.submitted or 0).strftime("%Y-%m-%d %H:%M:%S")
        st.markdown(f"**{md_escape(job.description or ' '.join(job.args))}** · submitted {when} · `{job.key}`")
        c.show_job(job, root)
        if job.state == "cancelled":
            st.caption(f"Cancelled: {md_escape(job.message or 'by the user')}.")
        if job.active:
            if st.button("Cancel", key=f"cancel_{job.key}"):
                jobs.cancel(job.key, root)
                st.rerun()
        elif st.button("Restart", key=f"restart_{job.key}",
                       help="run the same command again (a finished job's output is reused where it is intact)"):
            jobs.restart(job.key, root)
            st.rerun()
        with st.expander("Command and log"):
            st.code("python -m dtrak_core " + " ".join(job.args), language="bash")
            st.code(job.log_tail(30) or "(no output yet)")


@st.fragment(run_every=2.0)
def job_list() -> None:
    listed = jobs.list_jobs(root)
    if not listed:
        st.info("No jobs yet.")
        return
    finished = [j for j in listed if not j.active]
    queued = sum(j.state == "queued" for j in listed)
    running = sum(j.state == "running" for j in listed)
    head = st.columns([3, 1])
    head[0].markdown(f"{running} running, {queued} queued, {len(finished)} finished.")
    if head[1].button("Clear finished", disabled=not finished,
                      help="forget done, failed and cancelled jobs (their results stay in the cache)"):
        jobs.clear_finished(root)
        st.rerun()
    # Running first, then the queue in the order it runs, then finished jobs, newest first.
    rank = {"running": 0, "queued": 1}
    for job in sorted(listed, key=lambda j: (rank.get(j.state, 2), (j.submitted or 0) * (1 if j.active else -1))):
        job_row(job)


job_list()
