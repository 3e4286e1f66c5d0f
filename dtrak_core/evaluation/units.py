"""The evaluation's units of work on disk: checksummed records written last, atomic files, fault points.

Every unit the LDS build, ``lds attribute|score`` and the counterfactual check write (the
targets, a model's output file, a score matrix, a counterfactual result) follows one set of rules:

- **one writer**: the caller claims the unit under an OS file lock (``dtrak_core.io.hold_lock`` /
  ``try_lock``) and, holding it, clears what a killed writer of the same unit left
  (:func:`clear_stale_temps`);
- **atomic**: each file is written to a temporary name beside it and renamed; a named
  :func:`dtrak_core.io.fault_point` sits between the two (the fault harness kills there, leaving
  the temporary file behind, as a power cut would);
- **checksummed, marker last**: a unit's JSON record carries ``record_sha256`` (the sha256 of its
  own canonical JSON without that field) and the sha256 of each data file of the unit; it is
  written after them, so it is the unit's completion marker;
- **verified on read**: a record must be byte for byte the canonical serialisation of itself and
  match its checksum, so any changed byte fails; a bad unit raises :class:`CorruptUnitError` for a
  reader and is redone by the command that owns it, never served.

Records written before checksums existed (the committed benchmarks) have no ``record_sha256``:
they are read as they are (their bytes must still be canonical JSON) and gain one when rewritten.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Callable

from dtrak_core.io import atomic_path, fault_point, sha256_file, sha256_json

#: The field of a record that holds the checksum of the rest of it.
RECORD_CHECKSUM = "record_sha256"


class CorruptUnitError(ValueError):
    """A stored unit does not match its checksum (changed or torn after it was written)."""


def canonical_json(record: Any) -> bytes:
    """The bytes of a record file: sorted keys, indent 2, one final newline (``write_json_atomic``'s format)."""
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def record_checksum(record: dict) -> str:
    """sha256 of the record's compact sorted JSON without its ``record_sha256`` field."""
    return sha256_json({k: v for k, v in record.items() if k != RECORD_CHECKSUM})


def with_checksum(record: dict) -> dict:
    """The record with its ``record_sha256`` (re)computed."""
    body = {k: v for k, v in record.items() if k != RECORD_CHECKSUM}
    return {**body, RECORD_CHECKSUM: record_checksum(body)}


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], point: str) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, then it is renamed onto ``path``;
    the fault point ``point`` is hit in between (the file written, not yet in place)."""
    with atomic_path(path) as tmp:
        write(tmp)
        fault_point(point)


def write_record(path: str | os.PathLike, record: dict, point: str) -> dict:
    """Write ``record`` with its checksum to ``path`` (atomic, fault point ``point``); returns what was written."""
    record = with_checksum(record)
    data = canonical_json(record)
    write_atomic(path, lambda tmp: tmp.write_bytes(data), point)
    return record


def write_file(path: str | os.PathLike, write: Callable[[Path], None], point: str) -> str:
    """Write a data file of a unit atomically (fault point ``point``); returns its sha256 for the record."""
    write_atomic(path, write, point)
    return sha256_file(path)


def corrupt_message(path: str | os.PathLike, redo: str) -> str:
    return f"{path} does not match its checksum (changed after it was written); {redo}"


def read_record(path: str | os.PathLike, redo: str) -> dict | None:
    """The verified record at ``path``, None when there is none.

    Raises :class:`CorruptUnitError` (``redo``: what the user does about it) when the file is not
    the canonical JSON of a record whose ``record_sha256`` matches; a record without the field (written
    before checksums) only has to be canonical JSON.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptUnitError(f"{path} is not valid JSON (torn or changed after it was written); {redo}") from None
    if not isinstance(record, dict) or canonical_json(record) != raw:
        raise CorruptUnitError(corrupt_message(path, redo))
    if RECORD_CHECKSUM in record and record[RECORD_CHECKSUM] != record_checksum(record):
        raise CorruptUnitError(corrupt_message(path, redo))
    return record


def check_file(path: str | os.PathLike, expected_sha256: str | None, redo: str) -> None:
    """A data file of a unit against the sha256 its record holds (None: a record from before
    checksums, nothing to check); :class:`CorruptUnitError` when missing or different."""
    path = Path(path)
    if expected_sha256 is None:
        return
    if not path.is_file():
        raise CorruptUnitError(f"{path} is missing although its record lists it; {redo}")
    if sha256_file(path) != expected_sha256:
        raise CorruptUnitError(corrupt_message(path, redo))


def clear_stale_temps(*paths: str | os.PathLike) -> None:
    """Delete the temporary files a killed writer of ``paths`` left beside them.

    Call only while holding the unit's lock: a live writer of the same unit would lose its file.
    """
    for path in map(Path, paths):
        if path.parent.is_dir():
            for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
                stale.unlink(missing_ok=True)
