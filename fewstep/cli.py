"""The ``fewstep`` command line: ``fewstep list``, ``generate``, ``bench`` and ``calibrate dc``.

Usage errors (bad flags or values) print one line to stderr and exit with code 2; output files are
written atomically, so a failed run leaves none behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from . import __version__
from . import samplers as sampler_registry
from ._io import atomic_write, check_writable

__all__ = ["main", "build_parser"]


class UsageError(ValueError):
    """Bad command-line input: reported in one line, exit code 2."""


def _int_list(minimum: int, example: str):
    """argparse type: comma-separated integers >= ``minimum``."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            message = f"expected comma-separated integers like {example}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum} like {example}, got {text!r}")
        return values

    return parse


def _name_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    # flow-only samplers (flow-euler) too: on a VP model they fail with a clear message before anything runs
    available = sampler_registry.names("diffusion", standalone=True) + [
        n for n in sampler_registry.names("flow") if n != "flowchef"
    ]
    unknown = [v for v in values if v not in available]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {unknown or text!r}; available: {', '.join(available)}")
    return values


def _sampler_name(text: str) -> str:
    if text not in sampler_registry.names():
        raise argparse.ArgumentTypeError(f"unknown sampler {text!r}; available: {', '.join(sampler_registry.names())}")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _guidance_name(text: str) -> str:
    from . import guidance

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


def _options_dict(pairs: list[tuple[str, object]] | None) -> dict:
    out: dict = {}
    for key, value in pairs or []:
        if key in out:
            raise UsageError(f"--sampler-option {key} given twice")
        out[key] = value
    return out


def cmd_list(args: argparse.Namespace) -> int:
    width = max(len(n) for n in sampler_registry.names())
    for name in sampler_registry.names():
        print(f"{name:<{width}}  {sampler_registry.describe(name)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .pipelines.generate import generate, image_grid, load_model

    out = check_writable(args.out, "--out")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {args.out!r} must end in .png")
    if args.task is not None and args.quant is not None:
        raise UsageError("--quant applies to plain sampling of UNet pipelines (digits-eps, ...), not to --task")
    if args.gaussian_fill and (args.task != "inpaint" or args.model != "digits-flow" or args.posterior is not None):
        raise UsageError("--gaussian-fill is for FlowChef box inpainting: --model digits-flow --task inpaint")
    if args.task is not None and (args.compile or args.cuda_graph):
        flag = "--compile" if args.compile else "--cuda-graph"
        raise UsageError(f"{flag} applies to plain sampling (no --task)")
    edit_flags = [flag for flag, given in (("--source", args.source is not None),
                                           ("--source-class", args.source_classes is not None),
                                           ("--edit-size", args.edit_size is not None)) if given]
    if args.task != "edit" and edit_flags:
        raise UsageError(f"{', '.join(edit_flags)}: only with --task edit (FlowChef masked editing on digits-flow)")
    if args.task == "edit":
        posterior_flags = [flag for flag, value in _posterior_flags(args) if value is not None]
        if posterior_flags:
            raise UsageError(f"{', '.join(posterior_flags)} are for posterior sampling, not --task edit")
        return _generate_flowchef(args, out)
    if args.task is not None and (args.posterior is not None or args.model != "digits-flow"):
        return _generate_posterior(args, out)
    if args.task is not None:  # FlowChef
        return _generate_flowchef(args, out)
    posterior_flags = [flag for flag, value in _posterior_flags(args) if value is not None]
    if posterior_flags:
        raise UsageError(f"{', '.join(posterior_flags)} need --task inpaint|sr|deblur (posterior sampling)")
    if args.sampler == "flowchef":
        raise UsageError("--sampler flowchef steers towards a task: add --task inpaint|sr|deblur|classifier")
    args.sampler = args.sampler or "unipc"
    from . import guidance

    guidance.make(args.guidance, args.guidance_scale)  # validate the rule's parameters before loading a model
    options = _options_dict(args.sampler_option)
    if args.sampler == "dc-solver" and ("dc_ratios_file" in options or "dc_cpr" in options):
        # DC ratios are keyed by the guidance scale and the model: default them to this run's.
        options.setdefault("dc_guidance_scale", args.guidance_scale)
        options.setdefault("dc_model", args.model)
    if args.quiet:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # "Loading pipeline components" too
    pipe = load_model(args.model, args.sampler, device=args.device, dtype=args.dtype, sampler_options=options)
    pipe = _apply_quant(args, pipe)
    measurement = None
    if args.measurement is not None:
        from .pipelines.generate import load_measurement

        size = getattr(getattr(pipe, "unet", None), "config", None)
        measurement = load_measurement(args.measurement, size.sample_size if size is not None else 16)
    result = generate(
        pipe,
        num_images=args.num_images,
        steps=args.steps,
        seed=args.seed,
        classes=args.classes,
        prompt=args.prompt,
        guidance_scale=args.guidance_scale,
        progress=not args.quiet,
        guidance=args.guidance,
        measurement=measurement,
        compile=args.compile,
        cuda_graph=args.cuda_graph,
    )
    if result.measurements is not None:  # restoration: degraded inputs above their restorations
        n = len(result.images)
        columns = min(n, 10)
        rows = []
        for start in range(0, n, columns):
            rows += [result.measurements[start:start + columns], result.images[start:start + columns]]
        grid = image_grid(np.concatenate(rows), columns=columns)
    else:
        grid = image_grid(result.images)
    atomic_write(out, lambda p: grid.save(p, format="PNG"))
    guided = not (args.guidance == "cfg" and args.guidance_scale == 1.0)
    cfg_note = f" x2 ({args.guidance})" if guided and result.measurements is None else ""
    kind = "restored images (top: degraded input)" if result.measurements is not None else "images"
    print(f"wrote {out} ({len(result.images)} {kind}, sampler {args.sampler}, NFE {result.nfe}{cfg_note}, "
          f"{result.seconds:.2f} s)")
    return 0


# ---------------------------------------------------------------------------------------------- FlowChef
def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _add_flowchef_args(p_gen) -> None:
    from .pipelines.flowchef import EDIT_TASK, TASKS
    from .pipelines.posterior import POSTERIOR_TASKS

    p_gen.add_argument("--task", choices=list(dict.fromkeys(TASKS + (EDIT_TASK,) + POSTERIOR_TASKS)), default=None,
                       help="restore held-out test digits (or --measurement): FlowChef on digits-flow (inpaint, sr, "
                            "deblur; classifier steers towards --class; edit turns held-out digits (or --source) "
                            "into --class inside a centred square), posterior sampling (--posterior) on "
                            "digits-eps (also random-inpaint, sr-bicubic, motion-deblur)")
    p_gen.add_argument("--flowchef-step", type=_nonneg_float, default=None, metavar="ETA",
                       help="FlowChef step size eta (default per task)")
    p_gen.add_argument("--flowchef-inner-steps", type=_positive_int, default=None, metavar="M",
                       help="gradient steps per steered step (default per task)")
    p_gen.add_argument("--flowchef-steered-steps", type=int, default=None, metavar="K",
                       help="steer the first K steps (default: all but the last)")
    p_gen.add_argument("--flowchef-optimizer", choices=["gd", "adam"], default=None, help="default per task")
    p_gen.add_argument("--gaussian-fill", action="store_true",
                       help="--task inpaint on digits-flow: spread FlowChef's moves into the hole by the digits' "
                            "Gaussian prior (ours; see README, FlowChef)")
    p_gen.add_argument("--noise-std", type=_nonneg_float, default=0.0, help="measurement noise std (inverse tasks)")
    p_gen.add_argument("--source", default=None, metavar="IMAGE",
                       help="--task edit: images to edit (one 16x16 tile or a grid of them; default: held-out test "
                            "digits)")
    p_gen.add_argument("--source-class", dest="source_classes", type=_int_list(0, "3,7"), default=None,
                       help="--task edit with --source: the class each source tile shows (cycled)")
    p_gen.add_argument("--edit-size", type=_positive_int, default=None, metavar="N",
                       help="--task edit: side of the centred square that may change (default 12 of 16)")


def _generate_flowchef(args: argparse.Namespace, out) -> int:
    import dataclasses

    from .pipelines.flowchef import DEFAULT_CONFIGS, EDIT_TASK, as_numpy_images, run_edit, run_task
    from .pipelines.generate import image_grid, load_model

    if args.model != "digits-flow":
        raise UsageError(f"--task needs --model digits-flow (a rectified-flow model), got {args.model!r}")
    if args.prompt is not None:
        raise UsageError("--task takes no --prompt")
    editing = args.task == EDIT_TASK
    if not editing and args.guidance_scale is not None:
        raise UsageError(f"--guidance-scale is for --task edit (masked guidance), not --task {args.task}")
    if editing:
        if args.measurement is not None:
            raise UsageError("--task edit edits --source images (or held-out digits), it takes no --measurement")
        if args.noise_std:
            raise UsageError("--noise-std is for the inverse tasks (inpaint, sr, deblur)")
        if (args.source is None) != (args.source_classes is None):
            raise UsageError("--source and --source-class go together (what each source tile shows)")
        if args.edit_size is not None and args.edit_size > 16:
            raise UsageError(f"--edit-size must be <= 16 (the digits' side), got {args.edit_size}")
        if args.guidance_scale is not None and args.guidance_scale < 0:
            raise UsageError(f"--guidance-scale must be >= 0 for --task edit, got {args.guidance_scale}")
        if args.guidance != "cfg":
            raise UsageError(f"--task edit uses its own masked guidance; --guidance {args.guidance} does not apply")
    if args.measurement is not None and args.task == "classifier":
        raise UsageError("--measurement is for the inverse tasks (inpaint, sr, deblur), not --task classifier")
    if args.classes and args.task not in ("classifier", EDIT_TASK):
        raise UsageError(f"--class is for --task classifier or edit, not --task {args.task}")
    if args.noise_std and args.task == "classifier":
        raise UsageError("--noise-std is for the inverse tasks (inpaint, sr, deblur)")
    if args.flowchef_steered_steps is not None and not 0 <= args.flowchef_steered_steps <= args.steps:
        raise UsageError(f"--flowchef-steered-steps must be in 0..{args.steps} (--steps), "
                         f"got {args.flowchef_steered_steps}")
    changes = {k: v for k, v in (("step_size", args.flowchef_step), ("inner_steps", args.flowchef_inner_steps),
                                 ("steered_steps", args.flowchef_steered_steps),
                                 ("optimizer", args.flowchef_optimizer)) if v is not None}
    config = dataclasses.replace(DEFAULT_CONFIGS[args.task], **changes)
    sampler = "flow-euler" if args.sampler in (None, "flowchef") else args.sampler
    if args.quiet:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    pipe = load_model(args.model, sampler, device=args.device, dtype=args.dtype,
                      sampler_options=_options_dict(args.sampler_option))
    measurement = None
    if editing:
        source = None
        if args.source is not None:
            from .pipelines.generate import load_measurement

            source = load_measurement(args.source, pipe.unet.config.sample_size, flag="--source")
        scale = 4.0 if args.guidance_scale is None else args.guidance_scale
        result = run_edit(pipe, num_images=args.num_images, steps=args.steps, seed=args.seed,
                          target_classes=args.classes, config=config, guidance_scale=scale,
                          source=source, source_classes=args.source_classes,
                          **({} if args.edit_size is None else {"edit_size": args.edit_size}))
    else:
        if args.measurement is not None:
            from .guidance.operators import make_operator
            from .pipelines.generate import load_measurement

            size = pipe.unet.config.sample_size
            low = make_operator(args.task, size=size).output_shape((1, 1, size, size))[-1]
            measurement = load_measurement(args.measurement, low)
        result = run_task(pipe, args.task, num_images=args.num_images, steps=args.steps, seed=args.seed,
                          classes=args.classes, config=config, noise_std=args.noise_std, measurement=measurement,
                          gaussian_fill=args.gaussian_fill)
    images = as_numpy_images(result.images)
    if result.degraded is not None:
        n, columns = len(images), min(len(images), 10)
        degraded = as_numpy_images(result.degraded)
        rows = []
        for start in range(0, n, columns):
            rows += [degraded[start:start + columns], images[start:start + columns]]
        grid = image_grid(np.concatenate(rows), columns=columns)
    else:
        grid = image_grid(images)
    atomic_write(out, lambda p: grid.save(p, format="PNG"))
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
    kind = "edited images (top: source)" if editing else "images"
    fill = " + Gaussian fill" if args.gaussian_fill else ""
    print(f"wrote {out} ({len(images)} {kind}, FlowChef{fill} {args.task}: eta {config.step_size:g}, "
          f"M {config.inner_steps}, {config.optimizer}; sampler {sampler}, NFE {result.nfe}, {result.seconds:.2f} s; "
          f"{metrics})")
    return 0


# ---------------------------------------------------------------------------------------------- posterior
def _posterior_flags(args: argparse.Namespace) -> list[tuple[str, object]]:
    return [("--posterior", args.posterior), ("--posterior-step", args.posterior_step), ("--stsl-eta", args.stsl_eta),
            ("--stsl-inner-steps", args.stsl_inner_steps), ("--stsl-probes", args.stsl_probes),
            ("--gluing", args.gluing), ("--strength", args.strength)]


def _add_posterior_args(p_gen) -> None:
    p_gen.add_argument("--posterior", choices=["dps", "psld", "stsl"], default=None,
                       help="VP models (digits-eps): posterior sampler for --task (default stsl)")
    p_gen.add_argument("--posterior-step", type=_nonneg_float, default=None, metavar="ZETA",
                       help="posterior samplers: gradient step size zeta (default per method)")
    p_gen.add_argument("--stsl-eta", type=_nonneg_float, default=None, metavar="ETA",
                       help="STSL: weight of the trace (second-order) term (default 3 with the 'tweedie' "
                       "weighting; 0 = first order)")
    p_gen.add_argument("--stsl-inner-steps", type=_positive_int, default=None, metavar="K",
                       help="STSL: gradient iterations per step (default 1)")
    p_gen.add_argument("--stsl-probes", type=_positive_int, default=None, metavar="P",
                       help="STSL: Gaussian probes per iteration (default 1)")
    p_gen.add_argument("--gluing", type=_nonneg_float, default=None, metavar="GAMMA",
                       help="posterior samplers: PSLD gluing weight (default: psld 0.1, else off)")
    p_gen.add_argument("--strength", type=_finite_float, default=None,
                       help="STSL: fraction of the noise schedule to run from the noised A^T y (0, 1]")


def _generate_posterior(args: argparse.Namespace, out) -> int:
    from .pipelines.generate import image_grid, load_measurement, load_model
    from .pipelines.posterior import POSTERIOR_TASKS, default_method, run_inverse_task

    if args.task not in POSTERIOR_TASKS:
        raise UsageError(f"--task {args.task} is not an inverse problem; posterior sampling takes "
                         f"{', '.join(POSTERIOR_TASKS)}")
    if args.model == "digits-flow":
        raise UsageError("--posterior needs a VP diffusion model (digits-eps); digits-flow is a flow model: drop "
                         "--posterior to steer it with FlowChef")
    if args.prompt is not None or args.classes:
        raise UsageError("--task with --posterior restores images unconditionally: it takes no --prompt/--class")
    for flag, value in (("--flowchef-step", args.flowchef_step), ("--flowchef-inner-steps", args.flowchef_inner_steps),
                        ("--flowchef-steered-steps", args.flowchef_steered_steps),
                        ("--flowchef-optimizer", args.flowchef_optimizer)):
        if value is not None:
            raise UsageError(f"{flag} is for FlowChef (--model digits-flow), not posterior sampling")
    name = args.posterior or "stsl"
    stsl_only = {"--stsl-eta": args.stsl_eta, "--stsl-inner-steps": args.stsl_inner_steps,
                 "--stsl-probes": args.stsl_probes, "--strength": args.strength}
    given = [flag for flag, value in stsl_only.items() if value is not None]
    if name != "stsl" and given:
        raise UsageError(f"{', '.join(given)} apply to --posterior stsl, not {name}")
    overrides = {"step_size": args.posterior_step, "gluing": args.gluing}
    if name == "stsl":
        overrides.update(eta=args.stsl_eta, inner_steps=args.stsl_inner_steps, num_probes=args.stsl_probes,
                         strength=args.strength)
    method = default_method(name, **overrides)  # validates before a model is loaded
    if args.quiet:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    pipe = load_model(args.model, args.sampler or "ddim", device=args.device, dtype=args.dtype)
    measurement = None
    if args.measurement is not None:
        from .guidance.operators import make_operator

        size = pipe.unet.config.sample_size
        low = make_operator(args.task, size=size).output_shape((1, 1, size, size))[-1]
        measurement = load_measurement(args.measurement, low)
    result = run_inverse_task(pipe, args.task, method, num_images=args.num_images, steps=args.steps, seed=args.seed,
                              noise_std=args.noise_std, measurement=measurement)
    from .pipelines.flowchef import as_numpy_images

    images, degraded = as_numpy_images(result.images), as_numpy_images(result.degraded)
    n, columns = len(images), min(len(images), 10)
    rows = []
    for start in range(0, n, columns):
        rows += [degraded[start:start + columns], images[start:start + columns]]
    grid = image_grid(np.concatenate(rows), columns=columns)
    atomic_write(out, lambda p: grid.save(p, format="PNG"))
    metrics = "".join(f", {k} {v:.3f}" for k, v in result.metrics.items())
    print(f"wrote {out} ({n} restored images (top: degraded input), {name} {args.task}: steps {args.steps}, "
          f"NFE {result.nfe}, {result.seconds:.2f} s{metrics})")
    return 0


def _guidance_list(text: str) -> list[tuple[str, float]]:
    """argparse type: comma-separated ``RULE:SCALE`` (or ``RULE`` for its default scale), e.g. cfg:3,cfg++:0.6."""
    from .bench.runner import parse_guidance

    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected RULE:SCALE like cfg:3,cfg++:0.6, got {text!r}")
    try:
        return [parse_guidance(v) for v in items]
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_list(text: str) -> list[str]:
    """argparse type: comma-separated bench models."""
    from .bench.runner import MODELS, is_pipeline_dir

    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in MODELS and not is_pipeline_dir(v)]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown or text!r}; available: {', '.join(MODELS)} "
                                         "or a diffusers pipeline directory")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    models = args.model
    digits_only = ("guidance", "num_per_class", "classes", "batch_size", "reference_steps", "features",
                   "inception_weights", "reference_images")
    if models == ["analytic"] and args.out is None:  # the analytic table, as before the grid runner
        given = [f"--{k.replace('_', '-')}" for k in digits_only if getattr(args, k) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to the digits models, not --model analytic")
        return _bench_analytic_table(args)
    if args.out is None:
        raise UsageError(f"--model {','.join(models)} runs a benchmark grid: give --out DIR for its results")
    if args.json:
        raise UsageError("--json is for the analytic table; a grid run writes results.json into --out")
    if args.guidance is not None and models == ["analytic"]:
        raise UsageError("--guidance applies to the digits models (digits-eps, digits-flow), not --model analytic")
    from .bench.runner import RESULTS_FILES, BenchConfig, format_markdown, is_main_process, plot_results, run_grid

    defaults = {"guidance": [("cfg", 3.0)], "num_per_class": 20, "classes": list(range(10)), "batch_size": 250,
                "reference_steps": 200, "features": "digits-classifier", "inception_weights": None,
                "reference_images": None}
    options = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in digits_only}
    options["feature_extractor"] = options.pop("features")
    if options["inception_weights"] is not None and options["feature_extractor"] != "inception":
        raise UsageError("--inception-weights needs --features inception")
    prompts = _read_prompts(args.prompts) if args.prompts is not None else None
    config = BenchConfig(models=models, samplers=args.samplers, steps=args.steps, schedule=args.schedule,
                         num_samples=args.num_samples, dim=args.dim, seed=args.seed, prompts=prompts,
                         image_size=args.image_size, **options)
    rows = run_grid(config, args.out, cache_dir=args.cache_dir, progress=not args.quiet)
    if not is_main_process():  # under `accelerate launch`, one process reports
        return 0
    print(format_markdown(rows))
    from pathlib import Path

    out = Path(args.out)
    print(f"wrote {', '.join(str(out / name) for name in RESULTS_FILES.values())}")
    if args.plot != "none":
        target = out / f"{args.plot}_vs_nfe.png"
        try:
            plot_results(rows, target, metric=args.plot)
        except ImportError as exc:
            print(f"fewstep bench: skipping the plot: {exc}", file=sys.stderr)
        else:
            print(f"wrote {target}")
    return 0


def _bench_analytic_table(args: argparse.Namespace) -> int:
    if args.json:
        check_writable(args.json, "--json")
    from .bench.analytic_bench import format_table, rows_as_dicts, run_analytic_bench

    rows, meta = run_analytic_bench(
        samplers=args.samplers,
        steps=args.steps,
        schedule=args.schedule,
        num_samples=args.num_samples,
        dim=args.dim,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(format_table(rows, meta))
    if args.json:
        payload = {"meta": meta, "rows": rows_as_dicts(rows), "version": __version__}
        atomic_write(args.json, lambda p: p.write_text(json.dumps(payload, indent=2) + "\n"))
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------------------------- calibrate
def _float_list(text: str) -> list[float]:
    """argparse type: comma-separated finite numbers >= 0 (guidance scales)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1,3,7, got {text!r}") from None
    if not values or any(not (v >= 0 and v < float("inf")) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0 like 1,3,7, got {text!r}")
    return values


def _load_class_conditional(model: str, embedded: tuple[str, ...] = ("digits-eps",)):
    from pathlib import Path

    from .pipelines.defaults import DEFAULT_MODELS, load_default

    if model in embedded:
        return load_default(model, sampler=None)
    if model in DEFAULT_MODELS or not Path(model).is_dir():
        raise UsageError(f"--model {model!r}: this calibration needs {' or '.join(embedded)} or a class-conditional "
                         "pipeline directory")
    from .pipelines.class_conditional import ClassConditionalPipeline

    return ClassConditionalPipeline.from_pretrained(model)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate.dc import calibrate_class_conditional, calibrate_text_to_image, parse_reference
    from .solvers.dc_artifacts import fit_cpr, save_cpr, save_ratio_table

    out = check_writable(args.out, "--out")
    if args.cpr_out:
        check_writable(args.cpr_out, "--cpr-out")
    parse_reference(args.reference)
    if args.cpr_out and len(args.nfe) * len(args.guidance_scale) < 2:
        raise UsageError("--cpr-out needs ratios for at least 2 (NFE, CFG) pairs")
    import torch

    torch.manual_seed(args.seed)
    overrides = {"dc_base": args.base, "dc_order": args.order, "dc_variable": args.variable}
    common = dict(datapoints=args.datapoints, seed=args.seed, reference=args.reference, scheduler_overrides=overrides,
                  iters=args.iters, lr=args.lr, progress=not args.quiet, objective=args.objective)
    if args.prompts is not None:  # a text-to-image (SD 1.x/2.x) pipeline directory with (noise, prompt) datapoints
        from pathlib import Path

        from diffusers import StableDiffusionPipeline

        prompts = _read_prompts(args.prompts)
        if not prompts:
            raise UsageError(f"--prompts {args.prompts!r} holds no prompt (one per line)")
        if not (Path(args.model) / "model_index.json").is_file():
            raise UsageError(f"--model {args.model!r} must be an SD 1.x/2.x pipeline directory when --prompts is given")
        pipe = StableDiffusionPipeline.from_pretrained(args.model)
        entries, key = calibrate_text_to_image(pipe, prompts, args.nfe, args.guidance_scale, **common)
    else:
        pipe = _load_class_conditional(args.model)
        entries, key = calibrate_class_conditional(pipe, args.model, args.nfe, args.guidance_scale, **common)
    save_ratio_table(out, entries, args.model, key, {"version": __version__})
    for e in entries:
        print(f"NFE {e.nfe:>2} CFG {e.guidance_scale:g}: ratios " + " ".join(f"{r:.3f}" for r in e.ratios))
    print(f"wrote {out}")
    if args.cpr_out:
        cpr = fit_cpr(entries, order=args.order)
        save_cpr(args.cpr_out, cpr, args.model, key)
        print(f"wrote {args.cpr_out} (CPR fitted on NFE {cpr.nfe_range}, CFG {cpr.guidance_range})")
    return 0


def cmd_calibrate_ems(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .calibrate.ems import class_conditional_ems, text_to_image_ems
    from .solvers.ems import save_ems

    out = check_writable(args.out, "--out")
    common = dict(num_samples=args.samples, num_intervals=args.intervals, probes=args.probes, seed=args.seed,
                  t_start=args.t_start, t_end=args.t_end, checkpoint=args.checkpoint, progress=not args.quiet,
                  time_derivative=args.time_derivative)
    if args.prompts is not None:
        from diffusers import StableDiffusionPipeline

        prompts = _read_prompts(args.prompts)
        if not prompts:
            raise UsageError(f"--prompts {args.prompts!r} holds no prompt (one per line)")
        if not (Path(args.model) / "model_index.json").is_file():
            raise UsageError(f"--model {args.model!r} must be an SD 1.x/2.x pipeline directory when --prompts is given")
        pipe = StableDiffusionPipeline.from_pretrained(args.model)
        ems = text_to_image_ems(pipe, args.model, prompts, batch_size=args.batch_size or 16,
                                sample_steps=args.sample_steps, guidance_scale=args.guidance_scale, **common)
    else:
        pipe = _load_class_conditional(args.model, ("digits-eps", "digits-flow"))
        ems = class_conditional_ems(pipe, args.model, batch_size=args.batch_size or 256, **common)
    save_ems(out, ems)
    m = ems.meta
    print(f"EMS on {ems.num_points} lambda points x {ems.sample_shape} elements from {args.samples} samples: "
          f"{m.get('seconds')} s, peak memory {m.get('peak_memory_mib')} MiB on {m.get('device')}")
    print(f"wrote {out}")
    return 0


def _add_calibrate_parser(sub) -> None:
    p_cal = sub.add_parser("calibrate", help="offline calibration of samplers (DC-Solver ratios, DPM-Solver-v3 EMS)")
    cal_sub = p_cal.add_subparsers(dest="target", required=True, metavar="TARGET")
    p_dc = cal_sub.add_parser("dc", help="search DC-Solver ratios against a many-step reference (+ CPR fit)")
    p_dc.add_argument("--model", default="digits-eps",
                      help="digits-eps, a class-conditional pipeline directory, or (with --prompts) an SD 1.x/2.x "
                           "pipeline directory")
    p_dc.add_argument("--prompts", default=None, metavar="FILE",
                      help="text-to-image models: prompts, one per line, cycled over the datapoints")
    p_dc.add_argument("--nfe", type=_int_list(3, "5,6,8,10"), default=[5, 6, 8, 10], help="comma-separated NFEs")
    p_dc.add_argument("--guidance-scale", type=_float_list, default=[1.0, 3.0, 7.0],
                      help="comma-separated CFG scales (1 = unguided)")
    p_dc.add_argument("--datapoints", type=_positive_int, default=10, help="seeded datapoints (default 10)")
    p_dc.add_argument("--seed", type=int, default=0, help="seed of the datapoints' noise")
    p_dc.add_argument("--reference", default="ddim:200",
                      help="many-step reference METHOD:STEPS, METHOD ddim or dpm-solver++ (default ddim:200)")
    p_dc.add_argument("--base", choices=["unipc", "ddim", "dpm-solver++"], default="unipc", help="base solver")
    p_dc.add_argument("--order", type=int, choices=[1, 2, 3], default=2, help="interpolation order K")
    p_dc.add_argument("--variable", choices=["t", "lambda", "sigma"], default="t", help="interpolation variable")
    p_dc.add_argument("--iters", type=_positive_int, default=40, help="optimizer iterations per step")
    p_dc.add_argument("--lr", type=float, default=0.1, help="Adam learning rate")
    p_dc.add_argument("--objective", choices=["next", "final"], default="next",
                      help="search loss: next point after the corrector (paper) or the trajectory's end point")
    p_dc.add_argument("--out", required=True, help="ratio table to write (.safetensors)")
    p_dc.add_argument("--cpr-out", default=None, help="also fit CPR on the searched ratios and write it here")
    p_dc.add_argument("--quiet", action="store_true", help="no progress bars")
    p_dc.set_defaults(func=cmd_calibrate)

    p_ems = cal_sub.add_parser("ems", help="DPM-Solver-v3: estimate the empirical model statistics (EMS) of a model")
    p_ems.add_argument("--model", default="digits-eps",
                       help="digits-eps, a class-conditional pipeline directory, or (with --prompts) an SD 1.x/2.x "
                            "pipeline directory")
    p_ems.add_argument("--prompts", default=None, metavar="FILE",
                       help="text-to-image models: prompts (one per line) for the model's own samples")
    p_ems.add_argument("--samples", type=_positive_int, default=1024, help="samples K (default 1024, the paper's)")
    p_ems.add_argument("--intervals", type=_positive_int, default=64,
                       help="lambda grid intervals N (N + 1 points; default 64)")
    p_ems.add_argument("--probes", type=_positive_int, default=1, help="Rademacher probes per sample (default 1)")
    p_ems.add_argument("--batch-size", type=_positive_int, default=None,
                       help="samples per JVP batch (default 256 digits, 16 SD)")
    p_ems.add_argument("--t-start", type=float, default=None, help="noisiest model time (default: the schedule's)")
    p_ems.add_argument("--t-end", type=float, default=None, help="least noisy model time (default: the schedule's)")
    p_ems.add_argument("--sample-steps", type=_positive_int, default=20,
                       help="SD: DPM-Solver++ steps for the model's own samples")
    p_ems.add_argument("--guidance-scale", type=float, default=7.5, help="SD: CFG scale of the model's own samples")
    p_ems.add_argument("--time-derivative", choices=["difference", "jvp"], default="difference",
                       help="d eps/d lambda: difference over one grid spacing (default; robust for models trained "
                            "on integer timesteps) or the exact JVP through the time input (the paper)")
    p_ems.add_argument("--seed", type=int, default=0, help="seed of the noise and probes")
    p_ems.add_argument("--checkpoint", default=None, metavar="FILE",
                       help="running sums saved after every grid point; an existing file is resumed")
    p_ems.add_argument("--out", required=True, help="EMS file to write (.safetensors)")
    p_ems.add_argument("--quiet", action="store_true", help="no progress bars")
    p_ems.set_defaults(func=cmd_calibrate_ems)


# ---------------------------------------------------------------------------------------------- search
def cmd_search(args: argparse.Namespace) -> int:
    out = check_writable(args.out, "--out")
    if out.suffix.lower() != ".json":
        raise UsageError(f"--out {args.out!r} must end in .json")
    if args.model not in ("analytic", "digits-eps"):
        raise UsageError(f"--model {args.model!r} is not searchable here; available: analytic, digits-eps")
    if args.metric == "mse" and args.model != "digits-eps":
        raise UsageError("--metric mse is for --model digits-eps (the analytic model uses its exact solution)")
    from .search import SearchSpace, search
    from .search.objectives import AnalyticObjective, DigitsMSEObjective, DigitsObjective

    if args.ems not in ("auto", "none") and args.model != "digits-eps":
        raise UsageError("--ems FILE is for --model digits-eps (the analytic model has no EMS file)")
    ems = None if args.ems == "none" else args.ems
    if args.model == "analytic":
        objective = AnalyticObjective()
    elif args.metric == "mse":
        objective = DigitsMSEObjective(guidance_scale=args.guidance_scale, num_per_class=args.num_per_class, ems=ems)
    else:
        objective = DigitsObjective(guidance_scale=args.guidance_scale, num_per_class=args.num_per_class, ems=ems)
    space = SearchSpace(objective.noise_schedule, args.nfe, ems=objective.ems)
    initial = [_load_init_schedule(path, objective) for path in args.init or []]
    state = args.state or str(out) + ".state.json"
    result = search(objective, space, args.budget, seed=args.seed, use_predictor=not args.no_predictor,
                    state_path=state, progress=not args.quiet, initial=initial)
    best, value = result.best
    best.metadata.update(objective.metadata())
    best.metadata.update({"metric": objective.name, "value": value, "evaluations": len(result.evaluated),
                          "predictor": not args.no_predictor, "seed": args.seed, "version": __version__})
    if initial:  # the warm-start files, by name, so the search can be repeated
        best.metadata["init"] = [os.path.basename(p) for p in args.init]
    best.save(out)
    print(f"wrote {out} (NFE {args.nfe}, best {objective.name} metric {value:.4g} after "
          f"{len(result.evaluated)} evaluations; resumable state in {state})")
    return 0


def _load_init_schedule(path: str, objective):
    """``fewstep search --init FILE``: a schedule file searched for the same model (noise schedule)."""
    from .solvers.s3 import SolverSchedule

    try:
        schedule = SolverSchedule.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--init {path!r}: {exc}") from None
    expected = objective.metadata()["noise_schedule"]
    found = schedule.metadata.get("noise_schedule")
    if found is not None and found != expected:
        raise UsageError(f"--init {path!r} was searched for another model (noise schedule {found}, "
                         f"this search: {expected})")
    return schedule


def _add_search_parser(sub) -> None:
    p = sub.add_parser("search", help="S3: search a solver schedule for a model and NFE")
    p.add_argument("--model", default="digits-eps", help="analytic or digits-eps")
    p.add_argument("--nfe", type=_positive_int, required=True, help="number of model evaluations (>= 2)")
    p.add_argument("--budget", type=_positive_int, default=40, help="schedules to evaluate (default 40)")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="CFG scale for digits-eps (default 3)")
    p.add_argument("--num-per-class", type=_positive_int, default=20, help="digits-eps samples per class (7 classes)")
    p.add_argument("--metric", choices=["fd", "mse"], default="fd",
                   help="digits-eps: Frechet distance, or MSE to a 200-step reference solve (default fd)")
    p.add_argument("--ems", default="auto",
                   help="DPM-Solver-v3 tables that make 'ems' a prediction type of the search: auto (the model's "
                        "shipped EMS, if any), none, or an EMS file (digits-eps)")
    p.add_argument("--no-predictor", action="store_true", help="plain evolution (no performance predictor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", action="append", metavar="SCHEDULE",
                   help="warm start from a schedule file of this model, any NFE (steps are inserted or removed "
                        "to fit); repeatable")
    p.add_argument("--state", default=None, help="resumable search state (default: OUT.state.json)")
    p.add_argument("--out", required=True, help="where to write the best schedule (.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_search)


# ---------------------------------------------------------------------------------------------- quantize
def _fraction(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def cmd_quantize(args: argparse.Namespace) -> int:
    """``fewstep quantize``: calibrate a class-conditional model and save its W8A8 parameters."""
    from pathlib import Path

    from . import quant

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} exists and is not a directory")
    check_writable(out / quant.artifacts.META_FILE if out.is_dir() else out, "--out")
    if args.calib == "ndtc" and not 0 <= args.ndtc_mean <= 0.5:
        raise UsageError(f"--ndtc-mean must be in [0, 0.5] (NDTC: mean <= T/2), got {args.ndtc_mean}")
    if args.calib == "ndtc" and args.ndtc_std <= 0:
        raise UsageError(f"--ndtc-std must be > 0, got {args.ndtc_std}")
    if args.steps_kept is not None and args.steps_kept > args.steps:
        raise UsageError(f"--steps-kept must be <= --steps ({args.steps}), got {args.steps_kept}")
    patterns = list(args.exclude or [])
    if any(not pat.strip() for pat in patterns):
        raise UsageError("--exclude needs a non-empty fnmatch pattern (use --quantize-all to quantize every layer)")
    # --exclude adds to the default float boundary (conv_in, conv_out); --quantize-all drops that default
    exclude = patterns if args.quantize_all else [*quant.BOUNDARY_LAYERS, *patterns]
    config = quant.QuantConfig(format=args.format, metric=args.metric, p=args.p, split_skip=args.split_skip,
                               exclude=list(dict.fromkeys(exclude)))
    config.validate()
    if args.quiet:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    from .pipelines.swap import swap_sampler

    if args.model != "digits-eps" and not (Path(args.model) / "model_index.json").is_file():
        raise UsageError(f"--model {args.model!r}: quantization needs digits-eps or a class-conditional pipeline dir")
    pipe = swap_sampler(_load_class_conditional(args.model), args.sampler)
    pipe.set_progress_bar_config(disable=True)
    calibration = quant.build_calibration_set(
        pipe, num_samples=args.samples, steps=args.steps, method=args.calib, guidance_scale=args.guidance_scale,
        seed=args.seed, ndtc_mean=args.ndtc_mean, ndtc_std=args.ndtc_std, num_steps_kept=args.steps_kept,
        progress=not args.quiet)
    qmodel = quant.quantize(pipe.unet, calibration, config, progress=not args.quiet)
    error = _quant_output_error(pipe.unet, qmodel, calibration)
    quant.save_quantized(qmodel, out, model_id=args.model, extra={"calibration_output_rel_error": error})
    print(f"wrote {out / quant.artifacts.TENSORS_FILE}, {out / quant.artifacts.META_FILE} "
          f"({len(quant.quant_layers(qmodel))} layers W8A8 {args.format}, "
          f"{len(quant.quantizable_layers(qmodel))} in float, {args.calib} calibration on "
          f"{len(calibration)} network inputs, metric {args.metric}; output rel. error {100 * error:.2f}%)")
    return 0


def _quant_output_error(float_model, qmodel, calibration, rows: int = 256) -> float:
    """Relative L2 error of the quantized model's output on the first calibration rows."""
    import torch

    batch = next(calibration.batches(rows))
    with torch.no_grad():
        ref = float_model(**batch).sample
        got = qmodel(**batch).sample
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


def _add_quantize_parser(sub) -> None:
    from .quant.quantizers import FORMATS, METRICS

    p = sub.add_parser("quantize", help="PTQ4DM-style W8A8 post-training quantization of a UNet")
    p.add_argument("--model", default="digits-eps", help="digits-eps or a class-conditional pipeline directory")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for quant.safetensors + quant.json")
    p.add_argument("--calib", choices=["ndtc", "uniform"], default="ndtc",
                   help="calibration steps: PTQ4DM's NDTC (normal over steps) or Q-Diffusion's uniform grid")
    p.add_argument("--samples", type=_positive_int, default=256,
                   help="calibration inputs per CFG branch (default 256): ndtc one per trajectory, uniform spread "
                        "over the kept steps (trajectories x steps-kept for Q-Diffusion's proportions)")
    p.add_argument("--steps", type=_positive_int, default=20, help="steps of the calibration sampler (default 20)")
    p.add_argument("--sampler", type=_sampler_name, default="ddim", help="calibration sampler (default ddim)")
    p.add_argument("--guidance-scale", type=_fraction, default=3.0,
                   help="CFG scale of the calibration runs; both CFG branches are recorded (default 3)")
    p.add_argument("--metric", choices=list(METRICS), default="lp",
                   help="range-search criterion: lp (p=2.4, PTQ4DM), mse, cosine or kl (default lp)")
    p.add_argument("--p", type=_finite_float, default=2.4, help="exponent of the lp metric (default 2.4)")
    p.add_argument("--format", choices=list(FORMATS), default="int8", help="8-bit grid: int8 or fp8 (e4m3)")
    p.add_argument("--split-skip", action="store_true",
                   help="Q-Diffusion shortcut splitting: separate quantizers for the up blocks' skip concat")
    p.add_argument("--ndtc-mean", type=_fraction, default=0.4, help="NDTC mean as a fraction of the steps (0.4)")
    p.add_argument("--ndtc-std", type=_fraction, default=0.4, help="NDTC std as a fraction of the steps (0.4)")
    p.add_argument("--steps-kept", type=_positive_int, default=None,
                   help="uniform: evenly spaced steps recorded (default min(steps, 20))")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="also keep layers matching this fnmatch pattern in float (repeatable); adds to the default "
                        "float boundary conv_in + conv_out (PTQ4DM never quantizes x_t or the output)")
    p.add_argument("--quantize-all", action="store_true",
                   help="quantize every layer, conv_in and conv_out included (only --exclude patterns stay float)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration noise and NDTC draws")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)


def _add_quant_generate_args(p_gen) -> None:
    p_gen.add_argument("--quant", "--quantized", dest="quant", default=None, metavar="DIR",
                       help="run the UNet W8A8-quantized with parameters saved by `fewstep quantize`")
    p_gen.add_argument("--quant-mode", choices=["auto", "fake", "int8", "fp8", "dequant"], default="auto",
                       help="execution of the quantized layers: fake-quant reference, real int8 (_int_mm), fp8 "
                            "(CUDA SM>=8.9), dequant (8-bit storage, float compute); auto: each layer's own "
                            "8-bit format where the layer and device can run it, else fake")


def _apply_quant(args: argparse.Namespace, pipe):
    """``fewstep generate --quant DIR``: swap the pipeline's UNet for its quantized version."""
    if getattr(args, "quant", None) is None:
        return pipe
    from . import quant

    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise UsageError(f"--quant needs a UNet pipeline; {type(pipe).__name__} has no unet")
    meta = quant.read_metadata(args.quant)
    mode = args.quant_mode  # "auto" resolves per layer in QuantLayer.set_mode
    if mode in ("int8", "fp8") and mode != meta["format"]:
        raise UsageError(f"--quant-mode {mode} needs {mode} parameters; {args.quant!r} holds {meta['format']} "
                         f"(use --quant-mode auto, fake or dequant)")
    try:
        pipe.unet = quant.load_quantized(unet, args.quant, mode=mode, inplace=True)
    except RuntimeError as exc:  # fp8 without a capable GPU: the message names the fallbacks
        raise UsageError(f"--quant-mode {mode}: {exc}") from None
    return pipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewstep", description="Fast diffusion sampling on top of diffusers.")
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_list = sub.add_parser("list", help="list the registered samplers")
    p_list.set_defaults(func=cmd_list)

    from .pipelines.denoiser import COMPILE_MODES

    p_gen = sub.add_parser("generate", help="generate images with a fewstep sampler into a PNG grid")
    p_gen.add_argument("--model", default="digits-eps",
                       help="embedded model (digits-eps, digits-flow, digits-mr), a local pipeline directory "
                            "or a hub id")
    p_gen.add_argument("--sampler", type=_sampler_name, default=None,
                       help="registered sampler (fewstep list; default unipc, flow-euler with --task)")
    p_gen.add_argument("--sampler-option", type=_sampler_option, action="append", metavar="KEY=VALUE",
                       help="override a sampler config option, e.g. momentum_order=3.8 (repeatable)")
    p_gen.add_argument("--steps", type=_positive_int, default=10, help="number of sampler steps (default 10)")
    p_gen.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    p_gen.add_argument("--num-images", type=_positive_int, default=10, help="images to generate (default 10)")
    p_gen.add_argument("--class", dest="classes", type=_int_list(0, "3,7"), default=None,
                       help="comma-separated class ids for class-conditional models (default: cycle 0-9)")
    p_gen.add_argument("--prompt", default=None, help="text prompt for text-to-image pipelines")
    p_gen.add_argument("--measurement", default=None, metavar="IMAGE",
                       help="restoration models (digits-mr) and --posterior: degraded image file, one tile or a grid "
                            "of tiles of the measurement's size (16x16; 8x8 for 2x sr) (default: held-out test digits "
                            "degraded by the task)")
    p_gen.add_argument("--guidance", type=_guidance_name, default="cfg",
                       help="guidance rule: cfg, cfg++ (scale in [0, 1]) or apg (default cfg)")
    p_gen.add_argument("--guidance-scale", type=_finite_float, default=None,
                       help="scale of the guidance rule (default: cfg 3, cfg++ 0.6, apg 7.5)")
    p_gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p_gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p_gen.add_argument("--out", default="samples.png", help="output PNG grid (default samples.png)")
    p_gen.add_argument("--quiet", action="store_true", help="no progress bar")
    p_gen.add_argument("--compile", nargs="?", const="default", default=None, choices=list(COMPILE_MODES),
                       metavar="MODE", help="torch.compile the denoiser (mode: " + ", ".join(COMPILE_MODES)
                       + "; default when given without one: default)")
    p_gen.add_argument("--cuda-graph", action="store_true",
                       help="SD-family pipelines on CUDA: capture one denoising step in a CUDA graph and replay it")
    _add_flowchef_args(p_gen)
    _add_posterior_args(p_gen)
    _add_quant_generate_args(p_gen)
    p_gen.set_defaults(func=cmd_generate)

    p_bench = sub.add_parser("bench", help="error / FD / MSE versus NFE of samplers (a grid runner)")
    p_bench.add_argument("--model", type=_model_list, default=["analytic"],
                         help="comma-separated models: analytic, digits-eps, digits-flow (default: analytic)")
    p_bench.add_argument("--steps", type=_int_list(1, "5,10,20"), default=[5, 10, 20],
                         help="comma-separated step counts")
    p_bench.add_argument("--samplers", type=_name_list, default=None, help="comma-separated names (default: all)")
    p_bench.add_argument("--guidance", type=_guidance_list, default=None, metavar="RULE:SCALE,...",
                         help="digits models: comma-separated guidance settings, e.g. cfg:3,cfg++:0.6,apg:7.5 "
                              "(default cfg:3)")
    p_bench.add_argument("--num-per-class", type=_positive_int, default=None,
                         help="digits models: samples per class (default 20)")
    p_bench.add_argument("--classes", type=_int_list(0, "0,1,2"), default=None,
                         help="digits models: comma-separated classes (default 0-9)")
    p_bench.add_argument("--batch-size", type=_positive_int, default=None,
                         help="digits models: samples per pipeline call (default 250; results do not depend on it)")
    p_bench.add_argument("--reference-steps", type=_positive_int, default=None,
                         help="digits models: steps of the dpm-solver++ reference solve for the MSE (default 200)")
    p_bench.add_argument("--features", choices=["digits-classifier", "inception"], default=None,
                         help="features of the Frechet distance (default digits-classifier, digits models only; "
                              "inception = pytorch-fid's Inception-V3, needs its weights file; pipeline directories "
                              "get an FD only with inception)")
    p_bench.add_argument("--inception-weights", default=None, metavar="PATH",
                         help="pt_inception-2015-12-05-6726825d.pth (else $FEWSTEP_INCEPTION_WEIGHTS or torch hub's "
                              "cache); never downloaded")
    p_bench.add_argument("--prompts", default=None, metavar="FILE",
                         help="pipeline directories among --model: prompts, one per line (--num-per-class each)")
    p_bench.add_argument("--reference-images", default=None, metavar="DIR",
                         help="pipeline directories: FD to these images (png/jpg/..., one size = the generated size; "
                              "with --features inception); default: to the decoded reference solves")
    p_bench.add_argument("--image-size", type=_positive_int, default=None,
                         help="pipeline directories: image side in pixels (default: the pipeline's own)")
    p_bench.add_argument("--schedule", choices=["vp", "flow"], default="vp", help="analytic noise schedule")
    p_bench.add_argument("--num-samples", type=_positive_int, default=2000, help="analytic samples per cell")
    p_bench.add_argument("--dim", type=_positive_int, default=2, help="dimension of the analytic mixture")
    p_bench.add_argument("--seed", type=int, default=0, help="seed of the mixture / the first sample's noise")
    p_bench.add_argument("--out", default=None, metavar="DIR",
                         help="grid run: write results.json/.csv/.md (+ plot) here; re-runs skip finished cells")
    p_bench.add_argument("--cache-dir", default=None,
                         help="where reference statistics and solves are cached (default OUT/cache)")
    p_bench.add_argument("--plot", choices=["fd", "mse", "rmse", "accuracy", "none"], default="fd",
                         help="grid run: metric to plot versus NFE into OUT/METRIC_vs_nfe.png (needs matplotlib)")
    p_bench.add_argument("--json", default=None, help="analytic table: also write the results as JSON to this path")
    p_bench.add_argument("--quiet", action="store_true", help="no progress bar")
    p_bench.set_defaults(func=cmd_bench)

    _add_calibrate_parser(sub)
    _add_search_parser(sub)
    _add_quantize_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on malformed flags
    try:
        return args.func(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"fewstep {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
