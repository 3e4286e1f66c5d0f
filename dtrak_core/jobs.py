"""Background jobs: long work (featurization, ...) run as detached ``python -m dtrak_core`` processes.

A job is one CLI invocation, e.g. ``["featurize", "--model", "models/x", "--training-set"]``.
Its state lives in ``<root>/<key>/`` (root default: the cache's ``jobs/``), where ``key`` is a
content hash of the arguments, so asking twice for the same work finds the same job:

- ``spec.json``: the arguments and a description;
- ``status.json``: ``state`` (queued / running / done / failed / cancelled), ``pid``, the
  process start time (to tell a reused pid from ours), return code and timestamps;
- ``progress.json``: written by :func:`dtrak_core.progress.progress_bar` inside the job;
- ``job.log``: stdout and stderr.

The process is a small supervisor (``python -m dtrak_core.jobs run <dir>``) started in its own
session (so it outlives the app's script thread, page reloads and reruns, and ``killpg`` ends it
with its child); it runs the command with ``DTRAK_JOB_DIR`` set and records how it ended.

**One queue.** Jobs run one at a time per jobs folder (per cache, so per machine unless caches
are split), in submission order: a supervisor stays "queued" until it holds a slot, an
exclusive ``flock`` on ``<root>/.slots/slot-<i>.lock``. ``DTRAK_JOB_SLOTS`` (default 1) allows
more at once. The kernel releases a slot when its holder dies, so a killed job never blocks the
queue. Featurization is memory- and CPU-bound: two at once on a small machine are slower than
one after the other, and each holds gigabytes.
Submission is serialized with an exclusive ``fcntl.flock`` on ``<root>/.lock``: two tabs asking
at once start one process. A job whose process died without recording an end is reported as
failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from dtrak_core import paths
from dtrak_core.io import hold_lock, sha256_json, try_lock, write_json_atomic
from dtrak_core.progress import JOB_DIR_VARIABLE, PROGRESS_FILE

SPEC_FILE = "spec.json"
STATUS_FILE = "status.json"
LOG_FILE = "job.log"
LOCK_FILE = ".lock"
STATES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")
#: A queued job whose supervisor has not reported within this many seconds is considered dead.
QUEUED_GRACE_SECONDS = 120.0
SLOTS_DIR = ".slots"
SLOTS_VARIABLE = "DTRAK_JOB_SLOTS"
#: How often a queued supervisor tries for a slot (seconds): a few tries a second costs nothing.
SLOT_POLL_SECONDS = 0.25


class JobError(RuntimeError):
    """A job cannot be submitted, found or cancelled; the message says why."""


def default_root() -> Path:
    # Read at call time so a changed DTRAK_CACHE (tests, several app instances) is honoured.
    return paths.cache_dir() / "jobs"


def job_key(args: Sequence[str], identity: object = None) -> str:
    """Content hash of the CLI arguments (without the interpreter) and of ``identity``.

    ``identity`` names what the arguments do not show, e.g. the hash of the model weights the
    folder holds now: the same command on a retrained model is another job.
    """
    return sha256_json({"args": [str(a) for a in args], "identity": identity})[:20]


@dataclass
class Job:
    """A job's state as read from its folder.

    Attributes:
        key: content hash of ``args``; folder: ``<root>/<key>``.
        args: CLI arguments after ``python -m dtrak_core``.
        state: one of :data:`STATES`; progress: the last ``progress.json`` (or {}).
    """

    key: str
    folder: Path
    args: list[str]
    description: str
    state: str
    pid: int | None = None
    returncode: int | None = None
    submitted: float | None = None
    started: float | None = None
    finished: float | None = None
    message: str = ""
    progress: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def fraction(self) -> float | None:
        """Share of the work done (0..1) from the progress file, when it knows a total."""
        done, total = self.progress.get("done"), self.progress.get("total")
        if not total or done is None:
            return None
        return max(0.0, min(1.0, float(done) / float(total)))

    @property
    def eta_seconds(self) -> float | None:
        eta = self.progress.get("eta_seconds")
        return None if eta is None or not self.active else float(eta)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the log (tqdm's carriage-return updates collapsed)."""
        path = self.folder / LOG_FILE
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 64_000))
            text = f.read().decode(errors="replace")
        # tqdm redraws its bar with carriage returns: keep the last state of each line.
        rows = [row.split("\r")[-1] for row in text.split("\n")]
        return "\n".join([row for row in rows if row.strip()][-lines:])


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        # A reader can race the atomic replace only on filesystems without atomic rename; treat as absent.
        return {}


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/pid/stat), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    rest = stat[stat.rindex(")") + 2:].split()
    if rest[0] in ("Z", "X"):
        return None
    return rest[19]


def _reap(pid: int) -> None:
    # The supervisor is our child when this process submitted it: collect its exit so it does not
    # linger as a zombie (a zombie would still answer kill(pid, 0)).
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def _alive(pid: int, start_time: str | None) -> bool:
    _reap(pid)
    if not Path("/proc").is_dir():  # not Linux: fall back to signal 0
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    current = _process_start_time(pid)
    return current is not None and (start_time is None or current == start_time)


def read_job(folder: str | Path, _locked: bool = False) -> Job:
    """Read a job folder; a job whose process is gone without a recorded end becomes "failed"
    (``_locked``: the caller holds the jobs lock, see :func:`_dead`)."""
    folder = Path(folder)
    spec = _read_json(folder / SPEC_FILE)
    if not spec:
        raise JobError(f"{folder} is not a job folder (no readable {SPEC_FILE})")
    status = _read_json(folder / STATUS_FILE) or {"state": "queued"}
    job = Job(key=folder.name, folder=folder, args=list(spec.get("args", [])),
              description=spec.get("description", ""), state=status.get("state", "queued"),
              pid=status.get("pid"), returncode=status.get("returncode"),
              submitted=spec.get("submitted"), started=status.get("started"),
              finished=status.get("finished"), message=status.get("message", ""),
              progress=_read_json(folder / PROGRESS_FILE))
    if job.state == "running" and job.pid is not None and not _alive(job.pid, status.get("start_time")):
        return _dead(folder, job, status, f"the job's process {job.pid} ended without reporting (killed?)", _locked)
    if job.state == "queued" and job.submitted and time.time() - job.submitted > QUEUED_GRACE_SECONDS \
            and (job.pid is None or not _alive(job.pid, None)):
        return _dead(folder, job, status, "the job never started", _locked)
    return job


def _dead(folder: Path, job: Job, status: dict, message: str, locked: bool) -> Job:
    """``job``, whose process is gone without recording an end, recorded as failed, unless its
    status changed since it was read.

    A cancel kills the process and then records "cancelled" (under the jobs lock): a reader that
    read "running" just before must not overwrite that with "failed". So the status is read again
    under the lock. When another holds the lock (a cancel or submit in progress) the job is
    reported as read, and the next read decides. ``locked``: the caller holds the lock.
    """
    with contextlib.ExitStack() as stack:
        if not locked:
            if not stack.enter_context(try_lock(folder.parent / LOCK_FILE)):
                return job
            if _read_json(folder / STATUS_FILE) != status:  # moved on meanwhile (cancelled, restarted)
                return read_job(folder, _locked=True)
        job.state, job.message = "failed", message
        _write_status(folder, job, status.get("start_time"))
    return job


def _write_status(folder: Path, job: Job, start_time: str | None) -> None:
    write_json_atomic(folder / STATUS_FILE, {
        "state": job.state, "pid": job.pid, "start_time": start_time, "returncode": job.returncode,
        "started": job.started, "finished": job.finished, "message": job.message})


def submit(args: Sequence[str], description: str = "", root: str | Path | None = None,
           env: dict[str, str] | None = None, identity: object = None, rerun_done: bool = False) -> Job:
    """Start ``python -m dtrak_core <args>`` in the background, unless the same job is queued,
    running or done; returns the job (new or existing). Failed and cancelled jobs start again.

    Args:
        args: CLI arguments, e.g. ``["featurize", "--model", "m", "--training-set"]``.
        env: extra environment variables for the job.
        identity: JSON-able, part of the key (see :func:`job_key`).
        rerun_done: start a finished ("done") job again, e.g. when its output was deleted.
    """
    args = [str(a) for a in args]
    if not args:
        raise JobError("a job needs a command; got no arguments")
    root = Path(root) if root is not None else default_root()
    key = job_key(args, identity)
    folder = root / key
    with hold_lock(root / LOCK_FILE):
        if (folder / SPEC_FILE).exists():
            job = read_job(folder, _locked=True)
            if job.active or (job.state == "done" and not rerun_done):
                return job
        folder.mkdir(parents=True, exist_ok=True)
        for stale in (PROGRESS_FILE, LOG_FILE):
            (folder / stale).unlink(missing_ok=True)
        now = time.time()
        write_json_atomic(folder / SPEC_FILE, {"args": args, "description": description, "submitted": now,
                                               "identity": identity, "python": sys.executable,
                                               "cwd": os.getcwd()})
        job = Job(key, folder, args, description, "queued", submitted=now)
        _write_status(folder, job, None)
        child_env = {**os.environ, **(env or {}), JOB_DIR_VARIABLE: str(folder)}
        with open(folder / LOG_FILE, "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "dtrak_core.jobs", "run", str(folder)],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=child_env, start_new_session=True, close_fds=True)
        # Record the pid now so a cancel right after submission can find the process group.
        # The supervisor writes "running" under the same lock, so it cannot be overwritten here.
        job.pid = process.pid
        _write_status(folder, job, _process_start_time(process.pid))
    return job


def job_slots() -> int:
    """How many jobs may run at once (``DTRAK_JOB_SLOTS``, default 1)."""
    text = os.environ.get(SLOTS_VARIABLE, "1")
    try:
        slots = int(text)
    except ValueError:
        raise JobError(f"{SLOTS_VARIABLE}={text!r} must be a whole number of jobs >= 1") from None
    if slots < 1:
        raise JobError(f"{SLOTS_VARIABLE}={slots} must be at least 1")
    return slots


def queue_position(job: Job, root: str | Path | None = None) -> int | None:
    """1 for the next queued job to run, 2 after it, ...; None when ``job`` is not waiting."""
    if job.state != "queued":
        return None
    waiting = [j for j in list_jobs(root) if j.state == "queued"]
    waiting.sort(key=lambda j: j.submitted or 0.0)
    return next((i + 1 for i, j in enumerate(waiting) if j.key == job.key), None)


def clear_finished(root: str | Path | None = None) -> int:
    """Delete the folders of jobs that are no longer active (done, failed, cancelled); returns
    how many. Their outputs (features, results) are elsewhere and stay."""
    root = Path(root) if root is not None else default_root()
    removed = 0
    with hold_lock(root / LOCK_FILE):
        for job in list_jobs(root, _locked=True):
            if not job.active:
                shutil.rmtree(job.folder, ignore_errors=True)
                removed += 1
    return removed


def restart(key: str, root: str | Path | None = None) -> Job:
    """Submit a failed, cancelled or done job again (same arguments, identity and description)."""
    root = Path(root) if root is not None else default_root()
    job = get_job(key, root)
    if job is None:
        raise JobError(f"there is no job {key!r} in {root}")
    if job.active:
        return job
    spec = _read_json(job.folder / SPEC_FILE)
    return submit(job.args, job.description, root, identity=spec.get("identity"), rerun_done=True)


def get_job(key: str, root: str | Path | None = None, _locked: bool = False) -> Job | None:
    folder = (Path(root) if root is not None else default_root()) / key
    return read_job(folder, _locked) if (folder / SPEC_FILE).exists() else None


def find_job(args: Sequence[str], root: str | Path | None = None, identity: object = None) -> Job | None:
    """The job for exactly these arguments (and identity), if one was ever submitted."""
    return get_job(job_key(args, identity), root)


def list_jobs(root: str | Path | None = None, _locked: bool = False) -> list[Job]:
    """All jobs, newest first."""
    root = Path(root) if root is not None else default_root()
    if not root.is_dir():
        return []
    jobs = [read_job(folder, _locked) for folder in root.iterdir() if (folder / SPEC_FILE).exists()]
    return sorted(jobs, key=lambda j: j.submitted or 0.0, reverse=True)


def cancel(key: str, root: str | Path | None = None) -> Job:
    """Stop a queued or running job (SIGTERM to its process group) and mark it cancelled."""
    root = Path(root) if root is not None else default_root()
    with hold_lock(root / LOCK_FILE):
        job = get_job(key, root, _locked=True)
        if job is None:
            raise JobError(f"there is no job {key!r} in {root}")
        if not job.active:
            return job
        if job.pid is not None:
            try:
                os.killpg(job.pid, signal.SIGTERM)  # the supervisor leads its own session/group
            except (ProcessLookupError, PermissionError):
                pass
            _reap(job.pid)
        job.state, job.finished, job.message = "cancelled", time.time(), "cancelled by the user"
        _write_status(job.folder, job, None)
    return job


def _wait_for_slot(root: Path, key: str, stopped: list[int]) -> Iterator[int | None]:
    """Hold the first free slot (yields its number) until the caller is done; yields None when
    the job was cancelled while it waited. Only the ``slots`` earliest queued jobs try, so the
    queue runs in submission order."""
    slots = job_slots()
    (root / SLOTS_DIR).mkdir(parents=True, exist_ok=True)
    while not stopped:
        job = get_job(key, root)
        position = queue_position(job, root) if job is not None else None
        if position is not None and position > slots:
            time.sleep(SLOT_POLL_SECONDS)
            continue
        for i in range(slots):
            with try_lock(root / SLOTS_DIR / f"slot-{i}.lock") as mine:
                if mine:
                    yield i
                    return
        time.sleep(SLOT_POLL_SECONDS)
    yield None


def _run_supervisor(folder: Path) -> int:
    """Body of the detached process: wait for a slot, run the command, record how it ended."""
    spec = _read_json(folder / SPEC_FILE)
    start_time = _process_start_time(os.getpid())
    stopped: list[int] = []

    def stop(signum, _frame):
        # Cancel: killpg already signalled the command (same process group); only remember it. No
        # waiting here: the main thread is inside child.wait() and Popen's lock is not reentrant.
        stopped.append(signum)

    signal.signal(signal.SIGTERM, stop)
    slot = _wait_for_slot(folder.parent, folder.name, stopped)
    if next(slot) is None:
        return 128 + stopped[0]
    try:
        return _run_command(folder, spec, start_time, stopped)
    finally:
        slot.close()  # releases the slot's lock


def _run_command(folder: Path, spec: dict, start_time: str | None, stopped: list[int]) -> int:
    job = Job(folder.name, folder, spec["args"], spec.get("description", ""), "running", pid=os.getpid(),
              started=time.time())
    with hold_lock(folder.parent / LOCK_FILE):
        if _read_json(folder / STATUS_FILE).get("state") == "cancelled":
            return 0
        _write_status(folder, job, start_time)
    child = subprocess.Popen([sys.executable, "-m", "dtrak_core", *spec["args"]], stdin=subprocess.DEVNULL)
    if stopped:  # cancelled while starting
        child.terminate()
    code = child.wait()
    if stopped:
        return 128 + stopped[0]
    with hold_lock(folder.parent / LOCK_FILE):
        if _read_json(folder / STATUS_FILE).get("state") == "cancelled":
            return code
        job.returncode, job.finished = code, time.time()
        job.state = "done" if code == 0 else "failed"
        job.message = "" if code == 0 else f"exit code {code}; see {LOG_FILE}"
        _write_status(folder, job, start_time)
    return code


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "run":
        sys.exit("usage: python -m dtrak_core.jobs run <job folder>")
    sys.exit(_run_supervisor(Path(sys.argv[2])))
