"""``fewstep quantize``: PTQ4DM-style W8A8 calibration and the quantized artifact."""

from __future__ import annotations

import argparse

from .._io import check_creatable_dir, check_writable
from ._common import (
    UsageError,
    _finite_float,
    _fraction,
    _load_class_conditional,
    _positive_int,
    _sampler_name,
    _seed,
)


def cmd_quantize(args: argparse.Namespace) -> int:
    """``fewstep quantize``: calibrate a class-conditional model and save its W8A8 parameters."""
    from pathlib import Path

    from .. import quant

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out!r} exists and is not a directory")
    check_creatable_dir(args.out, "--out")  # also an empty --out, which Path("") would make the current directory
    check_writable(out / quant.artifacts.META_FILE if out.is_dir() else out, "--out")
    # options of one calibration method / metric are refused with another (they were silently ignored)
    for flag, value, applies, where in (("--ndtc-mean", args.ndtc_mean, args.calib == "ndtc", "--calib ndtc"),
                                        ("--ndtc-std", args.ndtc_std, args.calib == "ndtc", "--calib ndtc"),
                                        ("--steps-kept", args.steps_kept, args.calib == "uniform", "--calib uniform"),
                                        ("--p", args.p, args.metric == "lp", "--metric lp")):
        if value is not None and not applies:
            other = f"--calib {args.calib}" if flag.startswith(("--ndtc", "--steps")) else f"--metric {args.metric}"
            raise UsageError(f"{flag} applies to {where} only, not {other}")
    args.p = 2.4 if args.p is None else args.p
    if args.ndtc_mean is not None and not 0 <= args.ndtc_mean <= 0.5:
        raise UsageError(f"--ndtc-mean must be in [0, 0.5] (NDTC: mean <= T/2), got {args.ndtc_mean}")
    if args.ndtc_std is not None and args.ndtc_std <= 0:
        raise UsageError(f"--ndtc-std must be > 0, got {args.ndtc_std}")
    if args.p <= 0:
        raise UsageError(f"--p must be > 0 (the exponent of the lp metric), got {args.p}")
    if args.steps_kept is not None and args.steps_kept > args.steps:
        raise UsageError(f"--steps-kept must be <= --steps ({args.steps}), got {args.steps_kept}")
    if args.sampler == "s3":
        raise UsageError("--sampler s3 runs a searched schedule file, which quantize does not take; calibrate with "
                         "ddim, dpm-solver++ or unipc (the trajectories barely depend on the solver)")
    patterns = list(args.exclude or [])
    if any(not pat.strip() for pat in patterns):
        raise UsageError("--exclude needs a non-empty fnmatch pattern (use --quantize-all to quantize every layer)")
    # --exclude adds to the default float boundary (conv_in, conv_out); --quantize-all drops that default
    exclude = patterns if args.quantize_all else [*quant.BOUNDARY_LAYERS, *patterns]
    config = quant.QuantConfig(format=args.format, metric=args.metric, p=args.p, split_skip=args.split_skip,
                               exclude=list(dict.fromkeys(exclude)))
    config.validate()
    from ..pipelines.defaults import default_sampler_options
    from ..pipelines.swap import swap_sampler

    pipe = swap_sampler(_load_class_conditional(args.model, _EMBEDDED, "quantization"), args.sampler,
                        **default_sampler_options(args.model, args.sampler))  # e.g. the shipped EMS for v3
    pipe.set_progress_bar_config(disable=True)
    import fnmatch

    names = list(quant.quantizable_layers(pipe.unet))
    unmatched = [pat for pat in patterns if not any(fnmatch.fnmatch(name, pat) for name in names)]
    if unmatched:
        raise UsageError(f"--exclude {unmatched[0]!r} matches no layer of {args.model} (layer names look like "
                         f"{names[0]!r}, {names[len(names) // 2]!r})")  # fmt: skip
    if not quant.quantizable_layers(pipe.unet, exclude):
        raise UsageError(f"--exclude {' '.join(patterns)} leaves no layer of {args.model} to quantize")
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


#: the embedded models ``quantize`` calibrates by name (class-conditional UNets; digits-mr restores, it needs `mu`)
_EMBEDDED = ("digits-eps", "digits-flow")


def _quant_output_error(float_model, qmodel, calibration, rows: int = 256) -> float:
    """Relative L2 error of the quantized model's output on the first calibration rows."""
    import torch

    batch = next(calibration.batches(rows))
    with torch.no_grad():
        ref = float_model(**batch).sample
        got = qmodel(**batch).sample
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


def add_parser(sub: argparse._SubParsersAction, help_text: str) -> None:
    from ..quant.quantizers import FORMATS, METRICS

    p = sub.add_parser("quantize", help=help_text)
    p.add_argument("--model", default="digits-eps", help="digits-eps, digits-flow or a class-conditional pipeline "
                   "directory (default digits-eps)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for quant.safetensors + quant.json")
    p.add_argument("--calib", choices=["ndtc", "uniform"], default="ndtc",
                   help="calibration steps: PTQ4DM's NDTC (normal over steps; the default) or Q-Diffusion's uniform "
                        "grid")
    p.add_argument("--samples", type=_positive_int, default=256,
                   help="calibration inputs per CFG branch (default 256): ndtc one per trajectory, uniform spread "
                        "over the kept steps (trajectories x steps-kept for Q-Diffusion's proportions)")
    p.add_argument("--steps", type=_positive_int, default=20, help="steps of the calibration sampler (default 20)")
    p.add_argument("--sampler", type=_sampler_name, default="ddim", help="calibration sampler (default ddim)")
    p.add_argument("--guidance-scale", type=_fraction, default=3.0,
                   help="CFG scale of the calibration runs (default 3); both CFG branches are recorded when it "
                        "is not 1 (at 1 the model runs, and is calibrated, on the conditional branch only)")
    p.add_argument("--metric", choices=list(METRICS), default="lp",
                   help="range-search criterion: lp (p=2.4, PTQ4DM), mse, cosine or kl (default lp)")
    p.add_argument("--p", type=_finite_float, default=None, help="exponent of the lp metric (default 2.4)")
    p.add_argument("--format", choices=list(FORMATS), default="int8", help="8-bit grid: int8 (default) or fp8 (e4m3)")
    p.add_argument("--split-skip", action="store_true",
                   help="Q-Diffusion shortcut splitting: separate quantizers for the up blocks' skip concat")
    p.add_argument("--ndtc-mean", type=_fraction, default=None, help="NDTC mean as a fraction of the steps (0.4)")
    p.add_argument("--ndtc-std", type=_fraction, default=None, help="NDTC std as a fraction of the steps (0.4)")
    p.add_argument("--steps-kept", type=_positive_int, default=None,
                   help="uniform: evenly spaced steps recorded (default min(steps, 20))")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="also keep layers matching this fnmatch pattern in float (repeatable); adds to the default "
                        "float boundary conv_in + conv_out (PTQ4DM never quantizes x_t or the output)")
    p.add_argument("--quantize-all", action="store_true",
                   help="quantize every layer, conv_in and conv_out included (only --exclude patterns stay float)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the calibration noise and NDTC draws (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)
