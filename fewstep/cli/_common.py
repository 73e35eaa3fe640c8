"""Shared pieces of the ``fewstep`` command line: the usage error, argparse value types (each names the flag's
allowed values in its message) and the embedded-model loader the subcommands share."""

from __future__ import annotations

import argparse
import json

from .._checks import repeated_values


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def _refuse_repeats(values: list, text: str) -> None:
    """A comma-separated list naming one value twice would run (and report) its cells twice."""
    repeated = repeated_values(values)
    if repeated:
        raise argparse.ArgumentTypeError(f"{text!r} repeats {', '.join(repeated)}; give each value once")


def _int_list(minimum: int, example: str, unique: bool = True):
    """argparse type: comma-separated integers >= ``minimum``; ``unique``: each value once (a grid's axis, such as
    --steps, would run a cell twice), else repeats are kept (class lists: one entry per image or tile)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            message = f"expected comma-separated integers like {example}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum} like {example}, got {text!r}")
        if unique:
            _refuse_repeats(values, text)
        return values

    return parse


def _name_list(text: str) -> list[str]:
    from .. import samplers as sampler_registry

    values = [v.strip() for v in text.split(",") if v.strip()]
    # flow-only samplers (flow-euler) too, and those that need shipped artifacts (dpm-solver-v3's EMS, s3's
    # searched schedules): on a model or NFE they cannot run, the runner fails with a clear message before anything
    available = sampler_registry.names("diffusion") + [n for n in sampler_registry.names("flow") if n != "flowchef"]
    unknown = [v for v in values if v not in available]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {unknown or text!r}; available: {', '.join(available)}")
    _refuse_repeats(values, text)
    return values


def _sampler_name(text: str) -> str:
    from .. import samplers as sampler_registry

    if text not in sampler_registry.names():
        raise argparse.ArgumentTypeError(f"unknown sampler {text!r}; available: {', '.join(sampler_registry.names())}")
    return text


def int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum`` (also used by the benchmark scripts)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = int_at_least(1)


def _seed(text: str) -> int:
    """A seed torch's generators take: an integer in [0, 2**63 - 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63 - 1], got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63 - 1], got {text}")
    return value


def _guidance_name(text: str) -> str:
    from .. import guidance

    if guidance.is_posterior(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is an inverse-problem posterior sampler: use --task inpaint|sr|deblur --posterior {text}"
        )
    try:
        guidance.get(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return {"cfgpp": "cfg++"}.get(text, text)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _sampler_option(text: str) -> tuple[str, object]:
    """argparse type: ``KEY=VALUE``; VALUE is read as JSON (3.8, true, [1, 2]) and otherwise kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE like momentum_order=3.8, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _read_prompts(path: str) -> list[str]:
    """``--prompts FILE``: its non-empty lines, stripped."""
    from pathlib import Path

    if not Path(path).is_file():
        raise UsageError(f"--prompts {path!r}: no such file (one prompt per line)")
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def _options_dict(pairs: list[tuple[str, object]] | None, flag: str = "--sampler-option") -> dict:
    out: dict = {}
    for key, value in pairs or []:
        if key in out:
            raise UsageError(f"{flag} {key} given twice")
        out[key] = value
    return out


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _guidance_list(text: str) -> list[tuple[str, float]]:
    """argparse type: comma-separated ``RULE:SCALE`` (or ``RULE`` for its default scale), e.g. cfg:3,cfg++:0.6."""
    from ..bench.runner import parse_guidance

    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected RULE:SCALE like cfg:3,cfg++:0.6, got {text!r}")
    try:
        values = [parse_guidance(v) for v in items]
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    _refuse_repeats([f"{rule}:{scale:g}" for rule, scale in values], text)
    return values


def _model_list(text: str) -> list[str]:
    """argparse type: comma-separated bench models; a pipeline directory becomes its resolved absolute path, so one
    folder spelled two ways (``sd/pipe``, ``./sd/pipe``) is one model (a repeat), with one key in the results."""
    from ..bench.runner import MODELS, _normalise_model, is_pipeline_dir

    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in MODELS and not is_pipeline_dir(v)]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown or text!r}; available: {', '.join(MODELS)} "
                                         "or a diffusers pipeline directory")
    values = [_normalise_model(v) for v in values]
    _refuse_repeats(values, text)
    return values


def _float_list(text: str) -> list[float]:
    """argparse type: comma-separated finite numbers >= 0 (guidance scales)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1,3,7, got {text!r}") from None
    if not values or any(not (v >= 0 and v < float("inf")) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0 like 1,3,7, got {text!r}")
    _refuse_repeats([f"{v:g}" for v in values], text)
    return values


def _fraction(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _load_class_conditional(model: str, embedded: tuple[str, ...] = ("digits-eps",), purpose: str = "this calibration"):
    """``--model`` as one of the ``embedded`` defaults or a saved class-conditional pipeline directory (one with a
    ``model_index.json``); a ``UsageError`` saying what ``purpose`` needs otherwise."""
    from pathlib import Path

    from ..pipelines.defaults import DEFAULT_MODELS, load_default

    if model in embedded:
        return load_default(model, sampler=None)
    if model in DEFAULT_MODELS or not (Path(model) / "model_index.json").is_file():
        raise UsageError(f"--model {model!r}: {purpose} needs {' or '.join(embedded)} or a class-conditional "
                         "pipeline directory")
    from ..pipelines.class_conditional import ClassConditionalPipeline

    return ClassConditionalPipeline.from_pretrained(model)


def _load_prompted_sd(model: str, prompts_file: str):
    """``--model`` as an SD 1.x/2.x pipeline directory and the ``--prompts`` file (one prompt per line), for the
    text-to-image calibrations."""
    from pathlib import Path

    from diffusers import StableDiffusionPipeline

    prompts = _read_prompts(prompts_file)
    if not prompts:
        raise UsageError(f"--prompts {prompts_file!r} holds no prompt (one per line)")
    if not (Path(model) / "model_index.json").is_file():
        raise UsageError(f"--model {model!r} must be an SD 1.x/2.x pipeline directory when --prompts is given")
    return StableDiffusionPipeline.from_pretrained(model), prompts


def refuse_output_over_inputs(out_flag: str, out: str | None, *inputs: tuple[str, str | None]) -> None:
    """A ``UsageError`` naming both flags when the output file ``out`` (given as ``out_flag``) is one of the input
    files ``inputs`` (``(flag, path or None)`` pairs): writing it would destroy the input. Paths are compared
    resolved (``./x``, a symbolic link, a hard link to the same file)."""
    if out is None:
        return
    for flag, path in inputs:
        if path is not None and _same_file(out, path):
            raise UsageError(f"{out_flag} {out!r} is the {flag} file {path!r}: writing it would destroy that input; "
                             f"give {out_flag} another path")


def _same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file: equal once resolved (links, ``..``), or one inode."""
    import os

    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): not the same file
        return False
