"""``fewstep list`` and ``fewstep generate``: sampling into a PNG grid, with the FlowChef, posterior-sampling
and quantized-denoiser paths."""

from __future__ import annotations

import argparse
import os
import re

import numpy as np

from .. import samplers as sampler_registry
from .._io import atomic_write, check_writable
from ._common import (
    UsageError,
    _finite_float,
    _guidance_name,
    _int_list,
    _nonneg_float,
    _options_dict,
    _positive_int,
    _sampler_name,
    _sampler_option,
    _seed,
    refuse_output_over_inputs,
)


def cmd_list(args: argparse.Namespace) -> int:
    width = max(len(n) for n in sampler_registry.names())
    for name in sampler_registry.names():
        print(f"{name:<{width}}  {sampler_registry.describe(name)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ..pipelines.defaults import DEFAULT_MODELS
    from ..pipelines.generate import generate, image_grid, load_model

    out = check_writable(args.out, "--out")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {args.out!r} must end in .png")
    refuse_output_over_inputs("--out", args.out, ("--measurement", args.measurement), ("--source", args.source))
    quant_flags = [flag for flag, value in (("--quant-mode", args.quant_mode),
                                            ("--quant-conv-kernel", args.quant_conv_kernel)) if value is not None]
    if quant_flags and args.quant is None:
        raise UsageError(f"{', '.join(quant_flags)} need --quant DIR (a model saved by `fewstep quantize`)")
    if args.task is not None and args.quant is not None:
        raise UsageError("--quant applies to plain sampling of UNet pipelines (digits-eps, ...), not to --task")
    if args.quant is not None:
        _quant_metadata(args.quant)  # before loading any model
    if args.gaussian_fill and (args.task != "inpaint" or args.model != "digits-flow" or args.posterior is not None):
        raise UsageError("--gaussian-fill is for FlowChef box inpainting: --model digits-flow --task inpaint")
    if args.task is not None and (args.compile or args.cuda_graph):
        flag = "--compile" if args.compile else "--cuda-graph"
        raise UsageError(f"{flag} applies to plain sampling (no --task)")
    import torch

    from ..pipelines.generate import _resolve_device

    try:
        _resolve_device(args.device)  # before loading anything
    except ValueError as exc:
        raise UsageError(str(exc).replace("`device`", "--device", 1)) from None
    if args.cuda_graph and (args.device.startswith("cpu") or not torch.cuda.is_available()):
        raise UsageError(f"--cuda-graph needs a CUDA GPU (--device auto or cuda), got --device {args.device} "
                         f"(torch.cuda.is_available() = {torch.cuda.is_available()}); drop --cuda-graph")
    edit_flags = [flag for flag, given in (("--source", args.source is not None),
                                           ("--source-class", args.source_classes is not None),
                                           ("--edit-size", args.edit_size is not None)) if given]
    if args.task != "edit" and edit_flags:
        raise UsageError(f"{', '.join(edit_flags)}: only with --task edit (FlowChef masked editing on digits-flow)")
    if args.task not in (None, "edit") and (args.posterior is not None or args.model != "digits-flow"):
        return _generate_posterior(args, out)
    if args.task is not None:  # FlowChef: the inverse tasks and classifier steering on digits-flow, and editing
        posterior_flags = [flag for flag, value in _posterior_flags(args) if value is not None]
        if posterior_flags:  # FlowChef has its own steering flags: these were silently ignored
            raise UsageError(f"{', '.join(posterior_flags)} are for posterior sampling, not --task {args.task} "
                             "(FlowChef on digits-flow: it takes --flowchef-step, --flowchef-inner-steps, "
                             "--flowchef-steered-steps, --flowchef-optimizer)")  # fmt: skip
        return _generate_flowchef(args, out)
    posterior_flags = [flag for flag, value in _posterior_flags(args) if value is not None]
    if posterior_flags:
        raise UsageError(f"{', '.join(posterior_flags)} need --task {_inverse_tasks('digits-eps')} (posterior "
                         "sampling, on a VP model such as digits-eps)")
    flowchef_flags = [flag for flag, value in _flowchef_flags(args) if value is not None]
    if flowchef_flags:
        raise UsageError(f"{', '.join(flowchef_flags)}: FlowChef options, for --model digits-flow --task "
                         f"{_flowchef_tasks()}")
    if args.noise_std:
        raise UsageError(f"--noise-std adds noise to the measurement of an inverse task (--task "
                         f"{_inverse_tasks(args.model)}); plain sampling has none")  # fmt: skip
    if args.measurement is not None and args.model in ("digits-eps", "digits-flow"):
        raise UsageError(f"--measurement without --task is for the restoration model digits-mr; with --model "
                         f"{args.model} add --task {_inverse_tasks(args.model)}")  # fmt: skip
    if args.sampler == "flowchef":
        raise UsageError("--sampler flowchef steers the flow model towards a task: use --model digits-flow --task "
                         f"{_flowchef_tasks()} (FlowChef picks its sampler itself)")
    args.sampler = args.sampler or "unipc"
    guidance_flags = [f for f, v in (("--guidance", args.guidance), ("--guidance-scale", args.guidance_scale),
                                     ("--guidance-option", args.guidance_option)) if v is not None]  # fmt: skip
    args.guidance = args.guidance or "cfg"
    from .. import guidance

    guidance_options = _options_dict(args.guidance_option, "--guidance-option")
    if "guidance_scale" in guidance_options:
        raise UsageError("--guidance-option guidance_scale: give the scale as --guidance-scale")
    try:  # the rule's parameters are checked before a model loads
        guidance.make(args.guidance, args.guidance_scale, **guidance_options)
    except ValueError as exc:
        raise UsageError(f"--guidance {args.guidance}: {exc}") from None
    options = _options_dict(args.sampler_option)
    if args.sampler == "dc-solver" and ("dc_ratios_file" in options or "dc_cpr" in options):
        # DC ratios are keyed by the guidance scale and the model: default them to this run's.
        if args.guidance != "cfg" and "dc_guidance_scale" not in options:
            raise UsageError(f"--sampler-option dc_ratios_file/dc_cpr: DC ratios are fitted per CFG scale; with "
                             f"--guidance {args.guidance} this run has no CFG scale to look them up by: pass "
                             "--sampler-option dc_guidance_scale=W (or run --guidance cfg)")  # fmt: skip
        if args.guidance_scale is None and args.model not in DEFAULT_MODELS:
            raise UsageError("--sampler-option dc_ratios_file/dc_cpr: DC ratios are per CFG scale; "
                             "give --guidance-scale")
        options.setdefault("dc_guidance_scale", 3.0 if args.guidance_scale is None else args.guidance_scale)
        options.setdefault("dc_model", args.model)
    if args.measurement is None:  # (a restoration model's --measurement sets the count; it takes no --class)
        _check_class_count("--class", args.classes, _image_count(args), _count_text(args))
    pipe = load_model(args.model, args.sampler, device=args.device, dtype=args.dtype, sampler_options=options)
    pipe = _apply_quant(args, pipe)
    _check_steps(args, pipe)  # (a --class id the model lacks: the pipeline's own message gives the id and range)
    from ..pipelines import MeanRevertingPipeline

    if isinstance(pipe, MeanRevertingPipeline) and guidance_flags:
        raise UsageError(f"{', '.join(guidance_flags)}: {args.model} is a restoration (mean-reverting) model; it is "
                         "guided by its --measurement, not by a guidance rule")  # fmt: skip
    measurement = None
    if args.measurement is not None:
        from ..pipelines.generate import load_measurement

        size = getattr(getattr(pipe, "unet", None), "config", None)
        measurement = load_measurement(args.measurement, size.sample_size if size is not None else 16)
    try:
        result = generate(
            pipe,
            num_images=_image_count(args, measurement),
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
            guidance_options=guidance_options,
        )
    except FloatingPointError as exc:  # the pipeline's advice is its Python argument check_finite=False
        lower = [] if isinstance(pipe, MeanRevertingPipeline) else [_got("--guidance-scale", args.guidance_scale)]
        tries = ["more --steps", "another --sampler"] + ["other --sampler-option values"] * bool(args.sampler_option)
        raise _diverged(exc, args, lower, tries) from None
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
    cfg_note = f" x2 ({args.guidance})" if result.guided else ""  # the unconditional branch evaluated too
    kind = "restored images (top: degraded input)" if result.measurements is not None else "images"
    print(f"wrote {out} ({len(result.images)} {kind}, sampler {args.sampler}, NFE {result.nfe}{cfg_note}, "
          f"{result.seconds:.2f} s)")
    return 0


def _add_flowchef_args(p_gen) -> None:
    from ..pipelines.flowchef import EDIT_TASK, TASKS
    from ..pipelines.posterior import POSTERIOR_TASKS

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
    p_gen.add_argument("--noise-std", type=_nonneg_float, default=0.0,
                       help="measurement noise std (inverse tasks; default 0)")
    p_gen.add_argument("--source", default=None, metavar="IMAGE",
                       help="--task edit: images to edit (one 16x16 tile or a grid of them; default: held-out test "
                            "digits)")
    p_gen.add_argument("--source-class", dest="source_classes", type=_int_list(0, "3,3,7", unique=False),
                       default=None,
                       help="--task edit with --source: the class each source tile shows (cycled)")
    p_gen.add_argument("--edit-size", type=_positive_int, default=None, metavar="N",
                       help="--task edit: side of the centred square that may change (default 12 of 16)")


def _flowchef_tasks() -> str:
    """The ``--task`` values FlowChef runs on digits-flow (what ``_generate_flowchef`` validates against)."""
    from ..pipelines.flowchef import DEFAULT_CONFIGS

    return "|".join(DEFAULT_CONFIGS)


def _inverse_tasks(model: str) -> str:
    """The ``--task`` values that restore a measurement on ``model``: FlowChef's inverse tasks on digits-flow,
    posterior sampling's otherwise (the lists the two paths validate against)."""
    from ..pipelines.flowchef import INVERSE_TASKS
    from ..pipelines.posterior import POSTERIOR_TASKS

    return "|".join(INVERSE_TASKS if model == "digits-flow" else POSTERIOR_TASKS)


def _image_count(args: argparse.Namespace, loaded=None, flag: str = "--measurement") -> int:
    """``--num-images`` (default 10), or the number of tiles of a ``--measurement``/``--source`` file, which sets it:
    a different explicit ``--num-images`` is a usage error rather than silently ignored."""
    if loaded is None:
        return 10 if args.num_images is None else args.num_images
    n = int(loaded.shape[0])
    if args.num_images is not None and args.num_images != n:
        raise UsageError(f"--num-images {args.num_images}: {flag} holds {n} image(s) (one per tile), one result each; "
                         f"drop --num-images or pass {n}")  # fmt: skip
    return n


def _generate_flowchef(args: argparse.Namespace, out) -> int:
    import dataclasses

    from ..pipelines.flowchef import DEFAULT_CONFIGS, EDIT_TASK, as_numpy_images, run_edit, run_task
    from ..pipelines.generate import image_grid, load_model

    if args.model != "digits-flow":
        raise UsageError(f"--task needs --model digits-flow (a rectified-flow model), got {args.model!r}")
    if args.task not in DEFAULT_CONFIGS:
        raise UsageError(
            f"--task {args.task} is a posterior-sampling task (--posterior dps|psld|stsl on a VP model such as "
            f"digits-eps); FlowChef on digits-flow takes --task {'|'.join(DEFAULT_CONFIGS)}"
        )
    if args.prompt is not None:
        raise UsageError("--task takes no --prompt")
    editing = args.task == EDIT_TASK
    if not editing and args.guidance is not None:
        raise UsageError(f"--guidance {args.guidance} does not apply to FlowChef --task {args.task} (its steering is "
                         "the guidance)")  # fmt: skip
    if not editing and args.guidance_scale is not None:
        raise UsageError(f"--guidance-scale is for --task edit (masked guidance), not --task {args.task}")
    if args.guidance_option:
        raise UsageError(f"--guidance-option sets a guidance rule's options; FlowChef --task {args.task} runs no "
                         "guidance rule")
    if editing:
        if args.measurement is not None:
            raise UsageError("--task edit edits --source images (or held-out digits), it takes no --measurement")
        if args.noise_std:
            raise UsageError(f"--noise-std is for the inverse tasks ({_inverse_tasks(args.model)})")
        if (args.source is None) != (args.source_classes is None):
            raise UsageError("--source and --source-class go together (what each source tile shows)")
        if args.edit_size is not None and args.edit_size > 16:
            raise UsageError(f"--edit-size must be <= 16 (the digits' side), got {args.edit_size}")
        if args.guidance_scale is not None and args.guidance_scale < 0:
            raise UsageError(f"--guidance-scale must be >= 0 for --task edit, got {args.guidance_scale}")
        if args.guidance is not None:
            raise UsageError(f"--task edit uses its own masked guidance; --guidance {args.guidance} does not apply")
    if args.measurement is not None and args.task == "classifier":
        raise UsageError(f"--measurement is for the inverse tasks ({_inverse_tasks(args.model)}), not --task "
                         "classifier")
    if args.classes and args.task not in ("classifier", EDIT_TASK):
        raise UsageError(f"--class is for --task classifier or edit, not --task {args.task}")
    if args.task == "classifier" or (editing and args.source is None):  # the count is --num-images (default 10)
        _check_class_count("--class", args.classes, _image_count(args), _count_text(args))
    if args.noise_std and args.task == "classifier":
        raise UsageError(f"--noise-std is for the inverse tasks ({_inverse_tasks(args.model)})")
    if args.flowchef_steered_steps is not None and not 0 <= args.flowchef_steered_steps <= args.steps:
        raise UsageError(f"--flowchef-steered-steps must be in 0..{args.steps} (--steps), "
                         f"got {args.flowchef_steered_steps}")
    changes = {k: v for k, v in (("step_size", args.flowchef_step), ("inner_steps", args.flowchef_inner_steps),
                                 ("steered_steps", args.flowchef_steered_steps),
                                 ("optimizer", args.flowchef_optimizer)) if v is not None}
    options = _options_dict(args.sampler_option)
    steering = sorted(k for k in options if k.startswith("flowchef_"))
    if steering:
        raise UsageError(
            f"--sampler-option {', '.join(steering)}: a FlowChef --task run is steered by --flowchef-step, "
            "--flowchef-inner-steps, --flowchef-steered-steps and --flowchef-optimizer (its sampler underneath is "
            "flow-euler)"
        )
    config = dataclasses.replace(DEFAULT_CONFIGS[args.task], **changes)
    sampler = "flow-euler" if args.sampler in (None, "flowchef") else args.sampler
    pipe = load_model(args.model, sampler, device=args.device, dtype=args.dtype, sampler_options=options)
    _check_steps(args, pipe)
    _check_class_ids("--class", args.classes, pipe)
    _check_class_ids("--source-class", args.source_classes, pipe)
    measurement = None
    if editing:
        source = None
        if args.source is not None:
            from ..pipelines.generate import load_measurement

            source = load_measurement(args.source, pipe.unet.config.sample_size, flag="--source")
        scale = 4.0 if args.guidance_scale is None else args.guidance_scale
        count = _image_count(args, source, "--source")
        if source is not None:  # one class per source tile
            tiles = f"the {count} tile(s) of --source {args.source!r}"
            _check_class_count("--source-class", args.source_classes, count, tiles)
            _check_class_count("--class", args.classes, count, tiles)
    else:
        if args.measurement is not None:
            from ..guidance.operators import make_operator
            from ..pipelines.generate import load_measurement

            size = pipe.unet.config.sample_size
            low = make_operator(args.task, size=size).output_shape((1, 1, size, size))[-1]
            measurement = load_measurement(args.measurement, low)
        count = _image_count(args, measurement)
    try:
        if editing:
            result = run_edit(pipe, num_images=count, steps=args.steps, seed=args.seed, target_classes=args.classes,
                              config=config, guidance_scale=scale, source=source, source_classes=args.source_classes,
                              **({} if args.edit_size is None else {"edit_size": args.edit_size}))
        else:
            result = run_task(pipe, args.task, num_images=count, steps=args.steps, seed=args.seed,
                              classes=args.classes, config=config, noise_std=args.noise_std, measurement=measurement,
                              gaussian_fill=args.gaussian_fill)
    except FloatingPointError as exc:  # the library names no flag
        lower = [_got("--flowchef-step", config.step_size), _got("--flowchef-inner-steps", config.inner_steps)]
        if editing:
            lower.append(_got("--guidance-scale", scale))
        elif args.noise_std:
            lower.append(_got("--noise-std", args.noise_std))
        raise _diverged(exc, args, lower) from None
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


def _count_text(args: argparse.Namespace) -> str:
    """``N image(s) (--num-images N)``: the run's image count and where it comes from."""
    n = _image_count(args)
    return f"{n} image(s) (--num-images {n}{'' if args.num_images is not None else ', the default'})"


def _check_class_count(flag: str, classes: list[int] | None, count: int, what: str) -> None:
    """A class list gives one class per image (or source tile), cycled when shorter; a longer one would lose its
    tail silently (``--num-images 2 --class 3,3,7`` made no 7): a ``UsageError`` naming both counts."""
    if classes is not None and len(classes) > count:
        raise UsageError(f"{flag} {','.join(map(str, classes))} lists {len(classes)} classes for {what}: one class "
                         f"per image (a shorter list is cycled); give at most {count}")  # fmt: skip


def _check_class_ids(flag: str, classes: list[int] | None, pipe) -> None:
    """Class ids the loaded class-conditional model has (0..num_classes-1; the null class is no choice), checked
    before the run (the library's errors name its arguments, ``labels``, ``target_classes``)."""
    n = getattr(pipe, "num_classes", None)
    if classes and n is not None and any(c >= n for c in classes):
        raise UsageError(f"{flag} must list class ids in 0..{n - 1} (the model's classes), got "
                         f"{','.join(map(str, classes))}")  # fmt: skip


def _check_steps(args: argparse.Namespace, pipe, strength: float = 1.0) -> None:
    """--steps within the model's training timesteps, the bound its sampler checks (as `num_inference_steps`),
    before the run. ``strength`` < 1 (STSL) runs the last --steps of a grid of ``ceil(steps / strength)`` steps,
    which is what must fit."""
    import math

    limit = getattr(getattr(pipe.scheduler, "noise_schedule", None), "num_train_timesteps", None)
    if limit is None:
        return
    full = max(args.steps, math.ceil(args.steps / strength - 1e-9))
    if full <= limit:
        return
    if full == args.steps:
        raise UsageError(f"--steps must be <= {limit} (the model's training timesteps), got {args.steps}")
    given = "" if getattr(args, "strength", None) is not None else " (the default)"
    raise UsageError(f"--steps {args.steps} with --strength {strength:g}{given} runs the last {args.steps} steps of a "
                     f"{full}-step schedule, more than the model's {limit} training timesteps; lower --steps or raise "
                     "--strength")  # fmt: skip


def _got(flag: str, value) -> str:
    """``--flag (got VALUE)``, or the bare flag when it was not given."""
    if value is None:
        return flag
    return f"{flag} (got {value:g})" if isinstance(value, float) else f"{flag} (got {value})"


def _diverged(exc: FloatingPointError, args: argparse.Namespace, lower: list[str],
              tries: tuple[str, ...] | list[str] = ()) -> FloatingPointError:
    """The library's NaN/Inf error with its Python-API advice (``check_finite=False``, lower `step_size`) replaced
    by the flags of this command that steer the run: ``lower`` these, or ``tries`` those."""
    what = re.sub(r" \(the sampling diverged: [^)]*\)", " (the sampling diverged)", str(exc).split("; ")[0])
    if args.sampler is not None:  # the scheduler's class name: the flag's value instead
        what = re.sub(r"\(sampler \w+\)", f"(--sampler {args.sampler})", what)
    tries = list(tries) + (["--dtype float32"] if args.dtype != "float32" else [])
    advice = ([f"lower {' or '.join(lower)}"] if lower else []) + ([f"try {' or '.join(tries)}"] if tries else [])
    artifacts = _loaded_artifacts(args)
    if artifacts:  # a damaged or foreign artifact diverges a run too: name what this run loaded
        advice.append(f"check the artifact{'s' * (len(artifacts) > 1)} it loaded, {' and '.join(artifacts)} (a "
                      "damaged one diverges too)")
    return FloatingPointError(f"{what}; {', or '.join(advice)}; nothing was written")


#: sampler options that load an artifact file (EMS, searched schedule, DC ratios or CPR coefficients)
_ARTIFACT_OPTIONS = ("ems_file", "s3_schedule", "dc_ratios_file", "dc_cpr")


def _loaded_artifacts(args: argparse.Namespace) -> list[str]:
    """The flags of this run that load an artifact: ``--quant DIR`` and artifact-file ``--sampler-option``s (only
    those given as a file, not a shipped name or inline values)."""
    found = [f"--quant {args.quant}"] if getattr(args, "quant", None) is not None else []
    for key, value in getattr(args, "sampler_option", None) or ():
        if key in _ARTIFACT_OPTIONS and isinstance(value, str) and (os.sep in value or "." in value):
            found.append(f"--sampler-option {key}={value}")
    return found


def _flowchef_flags(args: argparse.Namespace) -> list[tuple[str, object]]:
    return [("--flowchef-step", args.flowchef_step), ("--flowchef-inner-steps", args.flowchef_inner_steps),
            ("--flowchef-steered-steps", args.flowchef_steered_steps),
            ("--flowchef-optimizer", args.flowchef_optimizer)]


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
                       help="STSL: fraction of the noise schedule to run from the noised A^T y, in (0, 1] "
                            "(default 0.5)")


def _generate_posterior(args: argparse.Namespace, out) -> int:
    from ..pipelines.generate import image_grid, load_measurement, load_model
    from ..pipelines.posterior import POSTERIOR_TASKS, default_method, run_inverse_task

    if args.task not in POSTERIOR_TASKS:
        raise UsageError(f"--task {args.task} is not an inverse problem; posterior sampling takes "
                         f"{', '.join(POSTERIOR_TASKS)}")
    if args.model == "digits-flow":
        raise UsageError("--posterior needs a VP diffusion model (digits-eps); digits-flow is a flow model: drop "
                         "--posterior to steer it with FlowChef")
    if args.prompt is not None or args.classes:
        raise UsageError("--task with --posterior restores images unconditionally: it takes no --prompt/--class")
    for flag, value in _flowchef_flags(args):
        if value is not None:
            raise UsageError(f"{flag} is for FlowChef (--model digits-flow), not posterior sampling")
    name = args.posterior or "stsl"
    ignored = [flag for flag, given in (("--sampler", args.sampler is not None),
                                        ("--sampler-option", bool(args.sampler_option)),
                                        ("--guidance", args.guidance is not None),
                                        ("--guidance-scale", args.guidance_scale is not None),
                                        ("--guidance-option", bool(args.guidance_option))) if given]  # fmt: skip
    if ignored:
        raise UsageError(f"{', '.join(ignored)} do not apply to posterior sampling: --posterior {name} runs its own "
                         "DDIM-type steps on the model's noise schedule, unconditionally")  # fmt: skip
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
    pipe = load_model(args.model, "ddim", device=args.device, dtype=args.dtype)
    _check_steps(args, pipe, method.strength)
    measurement = None
    if args.measurement is not None:
        from ..guidance.operators import make_operator

        size = pipe.unet.config.sample_size
        low = make_operator(args.task, size=size).output_shape((1, 1, size, size))[-1]
        measurement = load_measurement(args.measurement, low)
    count = _image_count(args, measurement)
    try:
        result = run_inverse_task(pipe, args.task, method, num_images=count, steps=args.steps, seed=args.seed,
                                  noise_std=args.noise_std, measurement=measurement)
    except FloatingPointError as exc:  # the library's advice names the method's arguments (`step_size`, ...)
        lower = [_got("--posterior-step", method.step_size)]
        if getattr(method, "gluing", 0):
            lower.append(_got("--gluing", method.gluing))
        if getattr(method, "eta", 0) and name == "stsl":
            lower.append(_got("--stsl-eta", method.eta))
        if args.noise_std:
            lower.append(_got("--noise-std", args.noise_std))
        raise _diverged(exc, args, lower) from None
    from ..pipelines.flowchef import as_numpy_images

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


def _add_quant_generate_args(p_gen) -> None:
    p_gen.add_argument("--quant", "--quantized", dest="quant", default=None, metavar="DIR",
                       help="run the UNet W8A8-quantized with parameters saved by `fewstep quantize`")
    from ..quant.modules import AUTO_MODE, MODES

    p_gen.add_argument("--quant-mode", choices=[AUTO_MODE, *MODES], default=None,
                       help="execution of the quantized layers: fake-quant reference, real int8 (_int_mm), fp8 "
                            "(_scaled_mm: CUDA SM>=8.9, or a CPU whose torch has the float8 kernel), dequant (8-bit "
                            "storage, float compute); auto (default): int8 layers on _int_mm, fp8 layers on CUDA "
                            "only, else fake")
    p_gen.add_argument("--quant-conv-kernel", choices=["im2col", "triton"], default=None,
                       help="fp8 convs: im2col + torch._scaled_mm (default), or the Triton implicit-GEMM fp8 conv "
                            "(needs triton and a CUDA GPU with SM>=8.9)")


def _quant_metadata(directory: str) -> dict:
    """The ``quant.json`` of ``--quant DIR`` (a usage error when the folder holds none, or an unusable one)."""
    from .. import quant

    try:
        return quant.read_metadata(directory)
    except FileNotFoundError:
        raise UsageError(f"--quant {directory!r} holds no saved quantization ({quant.artifacts.META_FILE} + "
                         f"{quant.artifacts.TENSORS_FILE}: write one with `fewstep quantize --out DIR`)") from None
    except ValueError as exc:
        raise UsageError(f"--quant {directory!r}: {exc}") from None


def _apply_quant(args: argparse.Namespace, pipe):
    """``fewstep generate --quant DIR``: swap the pipeline's UNet for its quantized version."""
    if getattr(args, "quant", None) is None:
        return pipe
    from .. import quant

    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise UsageError(f"--quant needs a UNet pipeline; {type(pipe).__name__} has no unet")
    meta = _quant_metadata(args.quant)
    mode = args.quant_mode or "auto"  # "auto" resolves per layer in QuantLayer.set_mode
    if mode in quant.FORMATS and mode != meta["format"]:
        usable = [m for m in (quant.AUTO_MODE, *quant.MODES) if m not in quant.FORMATS or m == meta["format"]]
        raise UsageError(f"--quant-mode {mode} needs {mode} parameters; {args.quant!r} holds {meta['format']} "
                         f"(use --quant-mode {', '.join(usable[:-1])} or {usable[-1]})")
    kernel = getattr(args, "quant_conv_kernel", None) or "im2col"
    if kernel != "im2col" and (meta["format"] != "fp8" or mode not in ("fp8", "auto")):
        raise UsageError(f"--quant-conv-kernel {kernel} runs fp8 convs: it needs fp8 parameters ({args.quant!r} holds "
                         f"{meta['format']}) and --quant-mode fp8 or auto (got {mode})")
    try:
        pipe.unet = quant.load_quantized(unet, args.quant, mode=mode, inplace=True)
    except RuntimeError as exc:  # fp8 without a capable GPU: the message names the fallbacks
        raise UsageError(f"--quant-mode {mode}: {exc}") from None
    if kernel != "im2col":
        try:
            quant.set_conv_kernel(pipe.unet, kernel)
        except (RuntimeError, ValueError) as exc:  # no Triton / GPU, or no conv that can take it
            raise UsageError(f"--quant-conv-kernel {kernel}: {exc}") from None
    return pipe


def add_list_parser(sub: argparse._SubParsersAction, help_text: str) -> None:
    """The ``list`` subcommand."""
    p_list = sub.add_parser("list", help=help_text)
    p_list.set_defaults(func=cmd_list)


def add_generate_parser(sub: argparse._SubParsersAction, help_text: str) -> None:
    """The ``generate`` subcommand."""
    from ..pipelines.denoiser import COMPILE_MODES

    p_gen = sub.add_parser("generate", help=help_text)
    p_gen.add_argument("--model", default="digits-eps",
                       help="embedded model (digits-eps, digits-flow, digits-mr), a local pipeline directory "
                            "or a hub id (default digits-eps)")
    p_gen.add_argument("--sampler", type=_sampler_name, default=None,
                       help="registered sampler (fewstep list; default unipc, flow-euler with --task)")
    p_gen.add_argument("--sampler-option", type=_sampler_option, action="append", metavar="KEY=VALUE",
                       help="override a sampler config option, e.g. momentum_order=3.8 (repeatable)")
    p_gen.add_argument("--steps", type=_positive_int, default=10, help="number of sampler steps (default 10)")
    p_gen.add_argument("--seed", type=_seed, default=0, help="random seed (same seed, same images; default 0)")
    p_gen.add_argument("--num-images", type=_positive_int, default=None,
                       help="images to generate (default 10; with --measurement/--source: one per tile of the file)")
    p_gen.add_argument("--class", dest="classes", type=_int_list(0, "3,3,7", unique=False), default=None,
                       help="comma-separated class ids for class-conditional models, one per image (cycled; repeats "
                            "allowed; default: cycle 0-9; --task edit: each source's class + 1)")
    p_gen.add_argument("--prompt", default=None, help="text prompt for text-to-image pipelines")
    p_gen.add_argument("--measurement", default=None, metavar="IMAGE",
                       help="restoration models (digits-mr) and --posterior: degraded image file, one tile or a grid "
                            "of tiles of the measurement's size (16x16; 8x8 for 2x sr) (default: held-out test digits "
                            "degraded by the task)")
    p_gen.add_argument("--guidance", type=_guidance_name, default=None,
                       help="guidance rule: cfg, cfg++ (scale in [0, 1]) or apg (default cfg)")
    p_gen.add_argument("--guidance-scale", type=_finite_float, default=None,
                       help="scale of the guidance rule (default: cfg 3, cfg++ 0.6, apg 7.5)")
    p_gen.add_argument("--guidance-option", type=_sampler_option, action="append", metavar="KEY=VALUE",
                       help="another argument of the guidance rule, e.g. eta=0.5 or momentum=0 (apg), "
                            "history=unconditional (cfg++), guidance_rescale=0.7 (cfg) (repeatable)")
    p_gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p_gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                       help="floating type of the model's weights and computation (default float32)")
    p_gen.add_argument("--out", default="samples.png", help="output PNG grid (default samples.png)")
    p_gen.add_argument("--quiet", action="store_true", help="no progress bar")
    p_gen.add_argument("--compile", nargs="?", const="default", default=None, choices=list(COMPILE_MODES),
                       metavar="MODE", help="torch.compile the denoiser (mode: " + ", ".join(COMPILE_MODES)
                       + "; default when given without one: default)")
    p_gen.add_argument("--cuda-graph", action="store_true",
                       help="on CUDA (SD-family, SD3, Flux and digits models): capture one denoising step in a CUDA "
                       "graph and replay it")
    _add_flowchef_args(p_gen)
    _add_posterior_args(p_gen)
    _add_quant_generate_args(p_gen)
    p_gen.set_defaults(func=cmd_generate)
