"""argparse types shared by the benchmark scripts: counts and output files are checked before any work runs
(a bad value is argparse's one-line usage error, exit 2, instead of a traceback or a run thrown away at the end)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fewstep._io import check_writable
from fewstep.cli._common import int_at_least

__all__ = ["count", "output_file", "positive_float"]


def count(minimum: int = 1) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum`` (the CLI's own)."""
    return int_at_least(minimum)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def output_file(text: str) -> str:
    """argparse type: a file path that can be created (its folder exists and is writable)."""
    try:
        return str(check_writable(text, "output file"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
