"""Kill a command at a named write point, rerun it, compare what it left.

``run_cli(args, fault="features.batch@2")`` runs ``python -m dtrak_core <args>`` in a fresh
process with ``DTRAK_FAULT`` set (see :func:`dtrak_core.io.fault_point`), on one thread.
``snapshot(folder)`` is the sha256 of every file below ``folder`` (relative path -> hash),
leaving out what is allowed to differ between two correct runs (``ignore`` globs: timestamps
in manifests, wall-clock seconds in recipes).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from dtrak_core.io import FAULT_ENV

REPO = Path(__file__).resolve().parents[2]
KILLED = -9


def run_cli(args: list[str], fault: str | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m dtrak_core *args`` in a child process; ``fault`` as ``DTRAK_FAULT``."""
    child_env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    child_env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    child_env.update(env or {})
    if fault:
        child_env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "dtrak_core", *map(str, args)], env=child_env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def snapshot(folder: str | Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of each file below ``folder`` by relative path, without paths matching ``ignore``."""
    folder = Path(folder)
    result = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(fnmatch.fnmatch(rel, pattern) for pattern in ignore):
            result[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result
