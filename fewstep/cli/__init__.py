"""The ``fewstep`` command line: ``list``, ``generate``, ``bench``, ``calibrate``, ``search`` and ``quantize``,
one module per subcommand (``_common`` holds the value types they share).

Usage errors (bad flags or values) print one line to stderr and exit with code 2; output files are
written atomically, so a failed run leaves none behind (an OS error such as a full disk is one line naming the
file, exit code 1; so is a run that runs out of memory, with the flags that make it smaller).

Importing this module imports nothing else of weight: argparse, ``_common`` (numpy) and the subcommand modules
(and with them torch and diffusers, seconds to import) are imported inside ``main``'s error handling, and only the
subcommand that runs: Ctrl-C while they load is the one-line "interrupted" too.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the rest is imported inside main's error handling (argparse, numpy via _common, ...)
    import argparse
    from collections.abc import Collection, Sequence

__all__ = ["main", "build_parser", "UsageError"]

#: subcommand -> (module, its function that adds the subcommand's parser, one-line help), in --help's order
SUBCOMMANDS = {
    "list": ("generate", "add_list_parser", "list the registered samplers"),
    "generate": ("generate", "add_generate_parser", "generate images with a fewstep sampler into a PNG grid"),
    "bench": ("bench", "add_parser", "error / FD / MSE versus NFE of samplers (a grid runner)"),
    "calibrate": ("calibrate", "add_parser", "offline calibration of samplers (DC-Solver ratios, DPM-Solver-v3 EMS)"),
    "search": ("search", "add_parser", "S3: search a solver schedule for a model and NFE"),
    "quantize": ("quantize", "add_parser", "PTQ4DM-style W8A8 post-training quantization of a UNet"),
}


def __getattr__(name: str):
    """``UsageError`` (and ``_Parser``), imported on first use: ``import fewstep.cli`` loads nothing heavy, so that
    Ctrl-C right after ``fewstep`` starts still meets ``main``'s error handling."""
    if name == "UsageError":
        from ._common import UsageError

        return UsageError
    if name == "_Parser":
        return _parser_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_PARSER_CLASS: list[type] = []


def _parser_class() -> type[argparse.ArgumentParser]:
    """argparse with one-line usage errors (``fewstep generate: error: ... (see fewstep generate --help)``, exit
    code 2) instead of a usage block above the message (made on first use: argparse is imported in ``main``).

    A subcommand's parser reports its own unknown arguments (argparse leaves them to the top-level parser, whose
    message pointed at ``fewstep --help``), and the innermost subcommand that parsed records its name
    (``fewstep calibrate dc``) as ``args._prog``, for ``main``'s messages."""
    if not _PARSER_CLASS:
        import argparse

        class _Parser(argparse.ArgumentParser):
            """argparse with one-line usage errors (exit code 2)."""

            #: the ``fewstep`` parser itself (``build_parser``), not a subcommand's
            top_level = False

            def error(self, message: str):  # type: ignore[override]
                self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

            def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
                namespace, extras = super().parse_known_args(args, namespace)
                if not self.top_level:
                    if extras:
                        self.error(f"unrecognized arguments: {' '.join(extras)}")
                    if not hasattr(namespace, "_prog"):  # the innermost subcommand's parser finishes first
                        namespace._prog = self.prog
                return namespace, extras

        _PARSER_CLASS.append(_Parser)
    return _PARSER_CLASS[0]


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``fewstep`` parser. ``commands``: the subcommands that get their flags (their modules are imported);
    the others are listed by ``fewstep --help`` but take none. ``None``: all of them."""
    import importlib

    from .. import __version__

    parser_class = _parser_class()
    parser = parser_class(prog="fewstep", description="Fast diffusion sampling on top of diffusers.")
    parser.top_level = True
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=parser_class)
    for name, (module, adder, help_text) in SUBCOMMANDS.items():
        if commands is None or name in commands:
            getattr(importlib.import_module(f".{module}", __name__), adder)(sub, help_text)
        else:  # never parsed: the command line names another subcommand (or none)
            sub.add_parser(name, help=help_text)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (``fewstep``'s own options, --help and
    --version, take no value); ``None`` when it names none of them."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in SUBCOMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fewstep`` command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code: 0, 2 for a
    usage error, 1 for a failed run (an OS error such as a full disk, a diverged run, memory run out: a
    ``MemoryError`` or torch's out-of-memory errors; other errors keep their traceback), 130 for Ctrl-C."""
    prog = "fewstep"
    restore: list = []  # (library logging module, whether its bars were on): --quiet's change ends with the call
    try:  # from the first import on (argparse, numpy, torch): Ctrl-C while the modules load is one line too
        argv = list(sys.argv[1:] if argv is None else argv)
        command = _command(argv)
        prog = f"fewstep {command}" if command else "fewstep"
        parser = build_parser([command] if command else ())
        try:
            args = parser.parse_args(argv)  # argparse exits 2 on malformed flags (0 for --help, --version)
        except SystemExit as exc:  # returned, as the docstring says, also when main runs in-process
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        prog = getattr(args, "_prog", prog)  # the full subcommand: `fewstep calibrate dc`
        if getattr(args, "quiet", False):  # also diffusers' "Loading pipeline components" and transformers' bars
            restore = _quiet_library_progress_bars()
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # UsageError is a ValueError
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a run that diverged (NaN/Inf), e.g. from a huge step size: no traceback
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: outputs are written atomically, so nothing half-written is left
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError as exc:  # e.g. numpy's "Unable to allocate ..." for a huge --num-images
        print(f"{prog}: error: {_out_of_memory_text(exc, prog)}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # torch's out-of-memory errors only; any other RuntimeError keeps its traceback
        if not _is_out_of_memory(exc):
            raise
        print(f"{prog}: error: {_out_of_memory_text(exc, prog)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout closed by its reader (`fewstep list | head`): stop quietly, as `ls | head`
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the pipe
    except OSError as exc:  # e.g. a full disk while writing an output (atomic: nothing half-written is left)
        print(f"{prog}: error: {_os_error_text(exc)}", file=sys.stderr)
        return 1
    finally:
        for logging_module, was_enabled in restore:
            if was_enabled:
                logging_module.enable_progress_bar()


#: what makes each subcommand's run smaller, for the out-of-memory message
_MEMORY_ADVICE = {
    "fewstep generate": "generate fewer images at once (--num-images)",
    "fewstep bench": "use a smaller --batch-size or fewer samples (--num-per-class; analytic: --num-samples, --dim)",
    "fewstep calibrate dc": "use fewer --datapoints",
    "fewstep calibrate ems": "use a smaller --batch-size or fewer --samples",
    "fewstep search": "use fewer --num-per-class",
    "fewstep quantize": "use fewer calibration --samples",
}
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")


def _is_out_of_memory(exc: RuntimeError) -> bool:
    """Whether ``exc`` is torch's out-of-memory error: ``torch.OutOfMemoryError`` (CUDA), or a ``RuntimeError``
    whose message says so (the CPU allocator's "DefaultCPUAllocator: can't allocate memory", MPS' "out of
    memory"). Looked up by name: torch need not be imported when the error comes."""
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    text = str(exc).lower()
    return any(words in text for words in _OUT_OF_MEMORY)


def _out_of_memory_text(exc: BaseException, prog: str) -> str:
    """One line for a run that ran out of memory: which memory (the GPU's or the machine's), the error's first
    line, and the flags of ``prog`` that make the run smaller."""
    import re

    lines = str(exc).strip().splitlines()
    # the first line, without the C++ allocator's "[enforce fail at alloc_cpu.cpp:127] err == 0. " prefix
    detail = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", lines[0].strip()) if lines else ""
    gpu = type(exc).__name__ == "OutOfMemoryError" or re.search(r"\b(CUDA|GPU|MPS|HIP|XPU)\b", detail)
    where = "GPU memory" if gpu else "memory (RAM)"
    advice = _MEMORY_ADVICE.get(prog, "make the run smaller")
    return (f"ran out of {where}{f' ({detail})' if detail else ''}; {advice}; outputs are written atomically, "
            "none is left half-written")


def _quiet_library_progress_bars() -> list:
    """Turn diffusers' (and transformers', where installed) progress bars off; returns what to turn back on."""
    from diffusers.utils import logging as diffusers_logging

    modules = [diffusers_logging]
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # transformers is optional (only text pipelines need it)
        pass
    else:
        modules.append(transformers_logging)
    restore = [(m, m.is_progress_bar_enabled()) for m in modules]
    for m in modules:
        m.disable_progress_bar()
    return restore


def _os_error_text(exc: OSError) -> str:
    """An ``OSError`` in one line without Python's ``[Errno N]`` prefix: its reason and the file(s) it names."""
    if not exc.strerror:
        return str(exc)
    names = [repr(str(f)) for f in (exc.filename, exc.filename2) if f is not None]
    return exc.strerror + (f": {' -> '.join(names)}" if names else "")


def _silence_stdout() -> None:
    """Point stdout at the null device, so that the interpreter's final flush of the lines still buffered for a
    closed pipe does not raise a second BrokenPipeError on exit."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind stdout (captured in tests): nothing to flush
        pass
