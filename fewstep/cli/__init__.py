"""The ``fewstep`` command line: ``list``, ``generate``, ``bench``, ``calibrate``, ``search`` and ``quantize``,
one module per subcommand (``_common`` holds the value types they share).

Usage errors (bad flags or values) print one line to stderr and exit with code 2; output files are
written atomically, so a failed run leaves none behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from . import bench, calibrate, generate, quantize, search
from ._common import UsageError

__all__ = ["main", "build_parser", "UsageError"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``fewstep generate: error: ... (see --help)``, exit code 2) instead of
    a usage block above the message."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fewstep", description="Fast diffusion sampling on top of diffusers.")
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    generate.add_parsers(sub)
    bench.add_parser(sub)
    calibrate.add_parser(sub)
    search.add_parser(sub)
    quantize.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on malformed flags
    if getattr(args, "quiet", False):  # also diffusers' "Loading pipeline components" and transformers' bars
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        try:
            from transformers.utils import logging as transformers_logging
        except ImportError:  # transformers is optional (only text pipelines need it)
            pass
        else:
            transformers_logging.disable_progress_bar()
    try:
        return args.func(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"fewstep {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a run that diverged (NaN/Inf), e.g. from a huge step size: no traceback
        print(f"fewstep {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: outputs are written atomically, so nothing half-written is left
        print(f"fewstep {args.command}: interrupted", file=sys.stderr)
        return 130
