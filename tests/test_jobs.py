"""Background jobs: real detached processes, deduplicated, cancellable, dead ones detected."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dtrak_core import jobs
from dtrak_core.io import try_lock


def wait_for(predicate, timeout: float = 90.0):
    """Poll ``predicate`` until it returns something truthy (bounded: fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


def finished(root: Path, key: str):
    job = jobs.get_job(key, root)
    return job if job is not None and not job.active else None


def featurize_args(tmp_path: Path) -> list[str]:
    from tests.attribution.conftest import synthetic_images, write_image_folder
    from dtrak_core.models import UNET_PRESETS, make_scheduler
    from dtrak_core.tasks import UnconditionalPixelTask

    UnconditionalPixelTask(UNET_PRESETS["tiny"].build(image_size=16), make_scheduler()).save(tmp_path / "model")
    data = write_image_folder(tmp_path / "data", synthetic_images(3))
    return ["featurize", "--model", str(tmp_path / "model"), "--data", str(data), "-K", "1", "-k", "32",
            "--device", "cpu", "--cache-dir", str(tmp_path / "features")]


def test_a_job_runs_once_reports_progress_and_is_found_again(tmp_path):
    """Four tabs submit the same work at once: one process; it finishes with progress and a log."""
    args, root = featurize_args(tmp_path), tmp_path / "jobs"
    results: list[jobs.Job] = []
    threads = [threading.Thread(target=lambda: results.append(jobs.submit(args, "features", root)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({j.key for j in results}) == 1 and len({j.pid for j in results}) == 1
    assert len(jobs.list_jobs(root)) == 1
    done = wait_for(lambda: finished(root, results[0].key))
    assert done.state == "done" and done.returncode == 0, done.log_tail()
    assert done.progress["done"] == done.progress["total"] == 3 and done.fraction == 1.0
    assert done.eta_seconds is None  # nothing left to wait for
    assert "3 x 32 features" in done.log_tail()
    assert json.loads((done.folder / jobs.SPEC_FILE).read_text())["args"] == args
    # Asking again for finished work returns the same job and starts nothing; unless told to rerun.
    again = jobs.submit(args, "features", root)
    assert again.state == "done" and again.pid == done.pid
    assert jobs.find_job(args, root).key == done.key


def test_a_failing_command_is_failed_and_resubmission_restarts_it(tmp_path):
    job = jobs.submit(["no-such-command"], "bad", tmp_path)
    failed = wait_for(lambda: finished(tmp_path, job.key))
    assert failed.state == "failed" and failed.returncode == 2 and "job.log" in failed.message
    assert "invalid choice" in failed.log_tail()
    again = jobs.submit(["no-such-command"], "bad", tmp_path)
    assert again.state == "queued" and again.pid != failed.pid
    assert jobs.cancel(again.key, tmp_path).state == "cancelled"


def test_identity_separates_jobs_with_the_same_arguments(tmp_path):
    assert jobs.job_key(["a"], "weights-1") != jobs.job_key(["a"], "weights-2")
    assert jobs.job_key(["a"]) == jobs.job_key(["a"]) != jobs.job_key(["b"])


def test_cancel_kills_the_process_group(tmp_path):
    # A long job: train a tiny model for very many steps on a small folder.
    from tests.conftest import write_image_folder

    data = write_image_folder(tmp_path / "data")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "model"), "--preset", "tiny", "--image-size", "16",
            "--steps", "1000000", "--batch-size", "2", "--checkpoint-every", "1000000"]
    job = jobs.submit(args, "long", tmp_path / "jobs")
    running = wait_for(lambda: (j := jobs.get_job(job.key, tmp_path / "jobs")) and j.state == "running" and j)
    cancelled = jobs.cancel(job.key, tmp_path / "jobs")
    assert cancelled.state == "cancelled"
    wait_for(lambda: jobs._process_start_time(running.pid) is None, timeout=30)
    assert jobs.get_job(job.key, tmp_path / "jobs").state == "cancelled"
    with pytest.raises(jobs.JobError, match="there is no job 'nope'"):
        jobs.cancel("nope", tmp_path / "jobs")


def test_a_dead_process_is_reported_as_failed(tmp_path):
    # A job folder whose process exited without recording an end (killed -9, machine reboot).
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = tmp_path / jobs.job_key(["x"])
    folder.mkdir()
    (folder / jobs.SPEC_FILE).write_text(json.dumps({"args": ["x"], "submitted": time.time()}))
    (folder / jobs.STATUS_FILE).write_text(json.dumps({"state": "running", "pid": gone.pid, "start_time": None}))
    dead = jobs.get_job(folder.name, tmp_path)
    assert dead.state == "failed" and "ended without reporting" in dead.message
    assert json.loads((folder / jobs.STATUS_FILE).read_text())["state"] == "failed"  # recorded


def test_a_job_cancelled_while_it_is_read_stays_cancelled(tmp_path, monkeypatch):
    # cancel() kills the process, then records "cancelled"; a reader that read "running" just
    # before found the process dead and recorded "failed" over it (1 cancel in 5 in a trial).
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = tmp_path / jobs.job_key(["x"])
    folder.mkdir()
    (folder / jobs.SPEC_FILE).write_text(json.dumps({"args": ["x"], "submitted": time.time()}))
    running = {"state": "running", "pid": gone.pid, "start_time": None}
    (folder / jobs.STATUS_FILE).write_text(json.dumps(running))
    real_alive = jobs._alive

    def cancelled_meanwhile(pid, start_time):  # the cancel lands between the read and this check
        (folder / jobs.STATUS_FILE).write_text(json.dumps({**running, "state": "cancelled",
                                                           "message": "cancelled by the user"}))
        return real_alive(pid, start_time)

    monkeypatch.setattr(jobs, "_alive", cancelled_meanwhile)
    assert jobs.get_job(folder.name, tmp_path).state == "cancelled"
    assert json.loads((folder / jobs.STATUS_FILE).read_text())["state"] == "cancelled"
    # While another holds the jobs lock (a cancel in progress) a reader reports what it read and writes nothing.
    monkeypatch.setattr(jobs, "_alive", real_alive)
    (folder / jobs.STATUS_FILE).write_text(json.dumps(running))
    with try_lock(tmp_path / jobs.LOCK_FILE) as mine:
        assert mine and jobs.get_job(folder.name, tmp_path).state == "running"
        assert json.loads((folder / jobs.STATUS_FILE).read_text()) == running
    assert jobs.get_job(folder.name, tmp_path).state == "failed"  # the next read decides


def long_training_args(tmp_path: Path) -> list[str]:
    from tests.conftest import write_image_folder

    data = write_image_folder(tmp_path / "data")
    return ["train", "--data", str(data), "--out", str(tmp_path / "model"), "--preset", "tiny", "--image-size", "16",
            "--steps", "1000000", "--batch-size", "2", "--checkpoint-every", "1000000"]


@pytest.mark.parametrize("slots", [1, 2])
def test_jobs_queue_one_at_a_time_unless_more_slots_are_allowed(tmp_path, monkeypatch, slots):
    monkeypatch.setenv(jobs.SLOTS_VARIABLE, str(slots))
    root = tmp_path / "jobs"
    first = jobs.submit(long_training_args(tmp_path), "long", root)
    wait_for(lambda: (j := jobs.get_job(first.key, root)) and j.state == "running")
    second = jobs.submit(["no-such-command"], "quick", root)
    if slots == 2:  # a free slot: the second runs (and fails fast) while the first still runs
        assert wait_for(lambda: finished(root, second.key)).state == "failed"
        assert jobs.get_job(first.key, root).state == "running"
        jobs.cancel(first.key, root)
        return
    waiting = jobs.get_job(second.key, root)
    assert waiting.state == "queued" and jobs.queue_position(waiting, root) == 1
    assert jobs.queue_position(jobs.get_job(first.key, root), root) is None  # running, not waiting
    cancelled = jobs.cancel(first.key, root)
    done = wait_for(lambda: finished(root, second.key))
    assert done.state == "failed" and done.started >= cancelled.finished  # it ran only after the slot was free


def test_a_cancelled_queued_job_never_runs_and_restart_and_clear_work(tmp_path, monkeypatch):
    monkeypatch.setenv(jobs.SLOTS_VARIABLE, "1")
    root = tmp_path / "jobs"
    first = jobs.submit(long_training_args(tmp_path), "long", root)
    wait_for(lambda: (j := jobs.get_job(first.key, root)) and j.state == "running")
    queued = jobs.submit(["no-such-command"], "quick", root)
    assert jobs.cancel(queued.key, root).state == "cancelled"
    wait_for(lambda: jobs._process_start_time(queued.pid) is None, timeout=30)  # its supervisor is gone
    assert jobs.get_job(queued.key, root).started is None  # it never ran
    jobs.cancel(first.key, root)
    again = jobs.restart(queued.key, root)
    assert again.key == queued.key and again.state == "queued"
    assert wait_for(lambda: finished(root, queued.key)).state == "failed"
    assert jobs.clear_finished(root) == 2 and jobs.list_jobs(root) == []
    with pytest.raises(jobs.JobError, match="must be at least 1"):
        monkeypatch.setenv(jobs.SLOTS_VARIABLE, "0")
        jobs.job_slots()
