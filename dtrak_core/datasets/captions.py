"""A captioned copy of an image folder: the same images, a ``metadata.csv`` with a ``text`` column.

Text-to-image models train on (image, caption) pairs. The caption of each row is a template
filled from its metadata, e.g. ``"{name}, {artist} style"`` -> "grinning face, openmoji style".

The copy is a separate folder because a dataset's identity is the hash of its pixels *and*
metadata: adding a column to emoji3 itself would change the data hash that every model trained
on it records. Images are hard links where the file system allows (no extra space; a link is a
regular file inside the folder, so the loader's confinement accepts it) and copies otherwise.
Written into a temporary folder and renamed, so a killed run leaves no half-made dataset.
"""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

import pandas as pd

from dtrak_core.datasets.imagefolder import METADATA_FILE, DatasetError, load_metadata

CAPTION_COLUMN = "text"


def template_fields(template: str) -> list[str]:
    """The metadata columns a template names: ``"{name}, {artist} style"`` -> ["name", "artist"]."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    if not fields:
        raise ValueError(f"caption template {template!r} names no metadata column; expected e.g. '{{name}}, {{artist}} style'")
    return fields


def captions(metadata: pd.DataFrame, template: str, source: str = "metadata.csv") -> list[str]:
    """One caption per row: ``template`` filled from the row's columns."""
    fields = template_fields(template)
    missing = [f for f in fields if f not in metadata.columns]
    if missing:
        raise DatasetError(f"{source} has no column {missing[0]!r} named by the caption template {template!r}; "
                           f"columns are {list(metadata.columns)}")
    return [template.format(**{f: str(row[f]) for f in fields}) for _, row in metadata.iterrows()]


def caption_folder(source: str | Path, out: str | Path, template: str) -> Path:
    """Write ``out``: every image of ``source`` and its metadata plus a ``text`` column."""
    source, out = Path(source), Path(out)
    metadata, paths = load_metadata(source)
    if CAPTION_COLUMN in metadata.columns:
        raise DatasetError(f"{source / METADATA_FILE} already has a {CAPTION_COLUMN!r} column; use it directly")
    metadata[CAPTION_COLUMN] = captions(metadata, template, str(source / METADATA_FILE))
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for file_name, path in zip(metadata["file_name"], paths):
        target = staging / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    metadata.to_csv(staging / METADATA_FILE, index=False)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out
