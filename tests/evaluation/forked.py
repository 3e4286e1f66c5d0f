"""``python -m dtrak_core ...`` in a forked child: the fault harness's ``run_cli`` without the imports.

A fresh interpreter spends ~5 s importing torch and diffusers before it does anything, and a fault
test kills and reruns a command a dozen times. A child forked from the test process already has
them: it runs :func:`dtrak_core.cli.main` with ``DTRAK_FAULT`` set (see
:func:`dtrak_core.io.fault_point`), on one thread like ``run_cli``'s children, its output in
files, and leaves with ``os._exit`` (it never returns into pytest). A SIGKILL at a fault point
gives return code -9, as ``subprocess`` reports it; ``fault="name@N:stop"`` stops the child there
(:meth:`Child.wait_stopped`, :meth:`Child.resume`) for two-worker tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from dtrak_core.io import FAULT_ENV

_numbers = count()


@dataclass
class Child:
    """A forked ``dtrak_core`` command: its pid and where its stdout and stderr go."""

    pid: int
    args: list[str]
    stdout: Path
    stderr: Path

    def wait(self) -> subprocess.CompletedProcess:
        """Wait for it to end; returncode -N when a signal N ended it."""
        _, status = os.waitpid(self.pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return subprocess.CompletedProcess(self.args, code, self.stdout.read_text(), self.stderr.read_text())

    def wait_stopped(self) -> None:
        """Return once the child has stopped itself at its ``:stop`` fault point."""
        _, status = os.waitpid(self.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"{self.args} ended instead of stopping: {self.stderr.read_text()}"

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def start_cli(args: list, logs: Path, fault: str | None = None) -> Child:
    """Fork and run ``python -m dtrak_core *args`` in the child; ``fault`` as ``DTRAK_FAULT``."""
    from dtrak_core.cli import main

    args = [str(a) for a in args]
    logs.mkdir(parents=True, exist_ok=True)
    number = next(_numbers)
    out, err = logs / f"{number:03d}.out", logs / f"{number:03d}.err"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return Child(pid, args, out, err)
    code = 1
    try:
        import torch

        torch.set_num_threads(1)  # as run_cli's children (OMP_NUM_THREADS=1): the same bits every run
        os.environ.pop(FAULT_ENV, None)
        if fault:
            os.environ[FAULT_ENV] = fault
        sys.stdout, sys.stderr = open(out, "w"), open(err, "w")
        try:
            code = main(args)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc(file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_cli(args: list, logs: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    """:func:`start_cli` and wait for it (the harness's ``run_cli``, forked)."""
    return start_cli(args, logs, fault).wait()
