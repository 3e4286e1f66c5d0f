"""What the markdown reports (``docs/benchmarks/lds.md``, ``counterfactual.md``) share.

Each report may carry hand-written notes (why ours differs from the paper), kept in
``notes.md`` beside the results they discuss, so they travel with the build.
"""

from __future__ import annotations

from pathlib import Path

from contextlib import nullcontext

from dtrak_core.evaluation.units import clear_stale_temps, write_atomic
from dtrak_core.io import hold_lock

#: Hand-written discussion beside a build's results (``<build>/notes.md``), copied into its report.
NOTES_FILE = "notes.md"


def notes_section(results_dir: Path) -> list[str]:
    """The report lines of ``<results_dir>/notes.md``: a blank line and its stripped text, or nothing."""
    notes = Path(results_dir) / NOTES_FILE
    return ["", notes.read_text().strip()] if notes.exists() else []


def write_markdown(out_path: str | Path, lines: list[str], point: str = "report",
                   lock: str | Path | None = None) -> Path:
    """Write ``lines`` joined by newlines to ``out_path`` atomically (readers never see half a file);
    ``point``: the write's fault point. With ``lock`` (a lock file every writer of this report
    holds), one writer at a time, which first clears what a killed writer left."""
    out_path = Path(out_path)
    text = "\n".join(lines)
    with hold_lock(lock) if lock is not None else nullcontext():
        if lock is not None:
            clear_stale_temps(out_path)
        write_atomic(out_path, lambda tmp: tmp.write_text(text), point)
    return out_path
