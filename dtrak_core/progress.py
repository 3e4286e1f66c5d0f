"""Progress bars that also report to a background job's status file.

Library code makes its bars with :func:`progress_bar`. In a terminal it is a plain tqdm bar
(with ETA). Inside a background job (``DTRAK_JOB_DIR`` set by :mod:`dtrak_core.jobs`) every bar
also writes its position, rate and ETA to the job's ``progress.json`` (at most twice a second),
which the app reads to show progress across page reloads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dtrak_core.io import write_json_atomic

JOB_DIR_VARIABLE = "DTRAK_JOB_DIR"
PROGRESS_FILE = "progress.json"


class _JobTqdm(tqdm):
    """A tqdm bar that mirrors its state into ``$DTRAK_JOB_DIR/progress.json``."""

    def __init__(self, *args: Any, job_dir: Path, **kwargs: Any) -> None:
        self._job_dir = job_dir
        self._last_write = 0.0
        super().__init__(*args, **kwargs)
        self._report(force=True)

    def _report(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_write < 0.5:
            return
        self._last_write = now
        elapsed = self.format_dict.get("elapsed", 0.0)
        rate = self.n / elapsed if elapsed > 0 and self.n else None
        remaining = (self.total - self.n) / rate if rate and self.total else None
        write_json_atomic(self._job_dir / PROGRESS_FILE, {
            "description": self.desc, "done": self.n, "total": self.total,
            "elapsed_seconds": round(elapsed, 1),
            "eta_seconds": None if remaining is None else round(remaining, 1),
            "updated": now,
        })

    def update(self, n: float | None = 1) -> bool | None:
        result = super().update(n)
        self._report(force=self.total is not None and self.n >= self.total)
        return result


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(...)``, reporting to the job's status file when run as a background job."""
    job_dir = os.environ.get(JOB_DIR_VARIABLE)
    # A disabled bar has nothing to report (and tqdm skips setting up its counters).
    if job_dir and not kwargs.get("disable"):
        return _JobTqdm(*args, job_dir=Path(job_dir), **kwargs)
    return tqdm(*args, **kwargs)
