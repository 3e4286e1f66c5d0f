"""Command-line options taken from the fields of a config dataclass.

A config dataclass is the one place of a setting's default and its meaning: its field declares
``metadata={"help": "..."}``, and :func:`add_field_option` makes the ``argparse`` option with that
default and help, so the command line cannot drift from the library.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import PurePath
from typing import Any

HELP = "help"


def config_field(config_class: type, name: str) -> dataclasses.Field:
    """The dataclass field ``name`` of ``config_class`` (a ``ValueError`` naming the fields if absent)."""
    for spec in dataclasses.fields(config_class):
        if spec.name == name:
            return spec
    raise ValueError(f"{config_class.__name__} has no field {name!r}; its fields are "
                     f"{[f.name for f in dataclasses.fields(config_class)]}")


def field_default(config_class: type, name: str) -> Any:
    """The default of field ``name`` (a fresh value for fields with a ``default_factory``)."""
    spec = config_field(config_class, name)
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    raise ValueError(f"{config_class.__name__}.{name} has no default; make it a required option")


def add_field_option(parser: argparse.ArgumentParser, config_class: type, name: str, *flags: str,
                     **kwargs: Any) -> argparse.Action:
    """Add the option ``flags`` for field ``name`` of ``config_class``.

    default: the field's default; help: the field's ``metadata["help"]``, followed by
    "(default: X)" when the default is a number, string or path (lists, None and flags are for
    the help to describe). Anything in ``kwargs`` (``type``, ``choices``, ``dest``, ``nargs``, a literal
    ``help``) is passed to ``add_argument`` and wins. The option's ``dest`` is argparse's
    (from the first long flag), not the field name.
    """
    spec = config_field(config_class, name)
    default = kwargs.pop("default") if "default" in kwargs else field_default(config_class, name)
    if HELP not in kwargs:
        text = str(spec.metadata.get(HELP, "")).replace("%", "%%")  # argparse formats help with %
        if isinstance(default, (int, float, str, PurePath)) and not isinstance(default, bool):
            text = f"{text} (default: %(default)s)".strip()
        kwargs[HELP] = text or None
    return parser.add_argument(*flags, default=default, **kwargs)
