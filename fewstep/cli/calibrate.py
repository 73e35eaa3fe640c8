"""``fewstep calibrate dc`` / ``calibrate ems``: DC-Solver ratios and DPM-Solver-v3 EMS tables."""

from __future__ import annotations

import argparse

from .. import __version__
from .._io import check_writable
from ._common import (
    UsageError,
    _finite_float,
    _float_list,
    _fraction,
    _int_list,
    _load_class_conditional,
    _load_prompted_sd,
    _positive_int,
    _same_file,
    _seed,
    int_at_least,
)


def _safetensors_out(path: str, flag: str):
    out = check_writable(path, flag)
    if out.suffix.lower() != ".safetensors":
        raise UsageError(f"{flag} {path!r} must end in .safetensors (the file is written in that format)")
    return out


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..calibrate.dc import calibrate_class_conditional, calibrate_text_to_image, parse_reference
    from ..solvers.dc_artifacts import fit_cpr, save_cpr, save_ratio_table

    out = _safetensors_out(args.out, "--out")
    if args.cpr_out is not None:  # an empty --cpr-out is refused by the check, not skipped
        if _same_file(str(_safetensors_out(args.cpr_out, "--cpr-out")), str(out)):  # also a link or hard link
            raise UsageError(f"--cpr-out {args.cpr_out!r} is the --out file; the CPR coefficients need a file of "
                             "their own")  # fmt: skip
    method, steps = parse_reference(args.reference)
    if method != "exact" and steps < max(args.nfe):
        raise UsageError(f"--reference {args.reference}: the reference solve needs at least as many steps as the "
                         f"largest --nfe ({max(args.nfe)})")  # fmt: skip
    if args.cpr_out is not None and len(args.nfe) * len(args.guidance_scale) < 2:
        raise UsageError("--cpr-out needs ratios for at least 2 (NFE, CFG) pairs")
    import torch

    # seeded for the run (as before: torch.manual_seed seeds every CUDA device too), without changing the caller's
    # global RNG streams (in-process `main`): forked on the CPU and on every visible CUDA device
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(args.seed)
        overrides = {"dc_base": args.base, "dc_order": args.order, "dc_variable": args.variable}
        common = dict(datapoints=args.datapoints, seed=args.seed, reference=args.reference,
                      scheduler_overrides=overrides, iters=args.iters, lr=args.lr, progress=not args.quiet,
                      objective=args.objective)
        if args.prompts is not None:  # a text-to-image (SD 1.x/2.x) pipeline directory with (noise, prompt) datapoints
            pipe, prompts = _load_prompted_sd(args.model, args.prompts)
            entries, key = calibrate_text_to_image(pipe, prompts, args.nfe, args.guidance_scale, **common)
        else:
            pipe = _load_class_conditional(args.model)
            entries, key = calibrate_class_conditional(pipe, args.nfe, args.guidance_scale, **common)
    save_ratio_table(out, entries, args.model, key, {"version": __version__})
    for e in entries:
        print(f"NFE {e.nfe:>2} CFG {e.guidance_scale:g}: ratios " + " ".join(f"{r:.3f}" for r in e.ratios))
    print(f"wrote {out}")
    if args.cpr_out is not None:
        cpr = fit_cpr(entries, order=args.order)
        save_cpr(args.cpr_out, cpr, args.model, key)
        print(f"wrote {args.cpr_out} (CPR fitted on NFE {cpr.nfe_range}, CFG {cpr.guidance_range})")
    return 0


def cmd_calibrate_ems(args: argparse.Namespace) -> int:
    from ..calibrate.ems import class_conditional_ems, text_to_image_ems
    from ..solvers.ems import save_ems

    out = _safetensors_out(args.out, "--out")
    if args.checkpoint is not None and check_writable(args.checkpoint, "--checkpoint").resolve() == out.resolve():
        raise UsageError(f"--checkpoint {args.checkpoint!r} is the --out file; the checkpoint needs a file of its own")
    common = dict(num_samples=args.samples, num_intervals=args.intervals, probes=args.probes, seed=args.seed,
                  t_start=args.t_start, t_end=args.t_end, checkpoint=args.checkpoint, progress=not args.quiet,
                  time_derivative=args.time_derivative)
    sd_only = [flag for flag, value in (("--sample-steps", args.sample_steps),
                                        ("--guidance-scale", args.guidance_scale)) if value is not None]
    if sd_only and args.prompts is None:
        raise UsageError(f"{', '.join(sd_only)}: for text-to-image models (with --prompts); the class-conditional "
                         "EMS are estimated on training data, not on the model's own samples")
    if args.prompts is not None:
        pipe, prompts = _load_prompted_sd(args.model, args.prompts)
        _check_time_grid(args, pipe)  # before the model's own samples are drawn (minutes)
        ems = text_to_image_ems(pipe, args.model, prompts, batch_size=args.batch_size or 16,
                                sample_steps=args.sample_steps or 20,
                                guidance_scale=7.5 if args.guidance_scale is None else args.guidance_scale, **common)
    else:
        pipe = _load_class_conditional(args.model, ("digits-eps", "digits-flow"))
        _check_time_grid(args, pipe)
        ems = class_conditional_ems(pipe, args.model, batch_size=args.batch_size or 256, **common)
    save_ems(out, ems)
    m = ems.meta
    print(f"EMS on {ems.num_points} lambda points x {ems.sample_shape} elements from {args.samples} samples: "
          f"{m.get('seconds')} s, peak memory {m.get('peak_memory_mib')} MiB on {m.get('device')}")
    print(f"wrote {out}")
    return 0


#: the library's argument names in the EMS grid's errors -> this command's flags
_EMS_FLAGS = {"num_intervals": "--intervals", "t_start": "--t-start", "t_end": "--t-end"}


def _check_time_grid(args: argparse.Namespace, pipe) -> None:
    """--intervals, --t-start and --t-end against the model's noise schedule, by the library's own check
    (``ems_lambdas``: the bounds depend on the schedule), in a ``UsageError`` that names the flags."""
    import re

    from ..calibrate.ems import _schedule_and_prediction
    from ..solvers.ems_estimate import ems_lambdas

    schedule, _ = _schedule_and_prediction(pipe.scheduler.config)
    try:
        ems_lambdas(schedule, args.intervals, args.t_start, args.t_end)
    except ValueError as exc:
        message = re.sub(r"`?\b(num_intervals|t_start|t_end)\b`?", lambda m: _EMS_FLAGS[m.group(1)], str(exc))
        raise UsageError(message) from None


def add_parser(sub: argparse._SubParsersAction, help_text: str) -> None:
    p_cal = sub.add_parser("calibrate", help=help_text)
    cal_sub = p_cal.add_subparsers(dest="target", required=True, metavar="TARGET")
    p_dc = cal_sub.add_parser("dc", help="search DC-Solver ratios against a many-step reference (+ CPR fit)")
    p_dc.add_argument("--model", default="digits-eps",
                      help="digits-eps (the default), a class-conditional pipeline directory, or (with --prompts) "
                           "an SD 1.x/2.x pipeline directory")
    p_dc.add_argument("--prompts", default=None, metavar="FILE",
                      help="text-to-image models: prompts, one per line, cycled over the datapoints")
    p_dc.add_argument("--nfe", type=_int_list(3, "5,6,8,10"), default=[5, 6, 8, 10],
                      help="comma-separated NFEs (default 5,6,8,10)")
    p_dc.add_argument("--guidance-scale", type=_float_list, default=[1.0, 3.0, 7.0],
                      help="comma-separated CFG scales (1 = unguided; default 1,3,7)")
    p_dc.add_argument("--datapoints", type=_positive_int, default=10, help="seeded datapoints (default 10)")
    p_dc.add_argument("--seed", type=_seed, default=0, help="seed of the datapoints' noise (default 0)")
    p_dc.add_argument("--reference", default="ddim:200",
                      help="many-step reference METHOD:STEPS, METHOD ddim or dpm-solver++ (default ddim:200)")
    p_dc.add_argument("--base", choices=["unipc", "ddim", "dpm-solver++"], default="unipc",
                      help="base solver (default unipc)")
    p_dc.add_argument("--order", type=int, choices=[1, 2, 3], default=2,
                      help="interpolation order K (default 2)")
    p_dc.add_argument("--variable", choices=["t", "lambda", "sigma"], default="t",
                      help="interpolation variable (default t)")
    p_dc.add_argument("--iters", type=_positive_int, default=40, help="optimizer iterations per step (default 40)")
    p_dc.add_argument("--lr", type=_finite_float, default=0.1, help="Adam learning rate (default 0.1)")
    p_dc.add_argument("--objective", choices=["next", "final"], default="next",
                      help="search loss: next point after the corrector (paper) or the trajectory's end point "
                           "(default next)")
    p_dc.add_argument("--out", required=True, help="ratio table to write (.safetensors)")
    p_dc.add_argument("--cpr-out", default=None, help="also fit CPR on the searched ratios and write it here")
    p_dc.add_argument("--quiet", action="store_true", help="no progress bars")
    p_dc.set_defaults(func=cmd_calibrate)

    p_ems = cal_sub.add_parser("ems", help="DPM-Solver-v3: estimate the empirical model statistics (EMS) of a model")
    p_ems.add_argument("--model", default="digits-eps",
                       help="digits-eps (the default), digits-flow, a class-conditional pipeline directory, or (with "
                            "--prompts) an SD 1.x/2.x pipeline directory")
    p_ems.add_argument("--prompts", default=None, metavar="FILE",
                       help="text-to-image models: prompts (one per line) for the model's own samples")
    p_ems.add_argument("--samples", type=_positive_int, default=1024, help="samples K (default 1024, the paper's)")
    p_ems.add_argument("--intervals", type=int_at_least(2), default=64,
                       help="lambda grid intervals N (N + 1 points; default 64)")
    p_ems.add_argument("--probes", type=_positive_int, default=1, help="Rademacher probes per sample (default 1)")
    p_ems.add_argument("--batch-size", type=_positive_int, default=None,
                       help="samples per JVP batch (default 256 digits, 16 SD)")
    p_ems.add_argument("--t-start", type=_finite_float, default=None,
                       help="noisiest model time (default: the schedule's)")
    p_ems.add_argument("--t-end", type=_finite_float, default=None,
                       help="least noisy model time (default: the schedule's)")
    p_ems.add_argument("--sample-steps", type=_positive_int, default=None,
                       help="SD: DPM-Solver++ steps for the model's own samples (default 20)")
    p_ems.add_argument("--guidance-scale", type=_fraction, default=None,
                       help="SD: CFG scale of the model's own samples (default 7.5)")
    p_ems.add_argument("--time-derivative", choices=["difference", "jvp"], default="difference",
                       help="d eps/d lambda: difference over one grid spacing (default; robust for models trained "
                            "on integer timesteps) or the exact JVP through the time input (the paper)")
    p_ems.add_argument("--seed", type=_seed, default=0, help="seed of the noise and probes (default 0)")
    p_ems.add_argument("--checkpoint", default=None, metavar="FILE",
                       help="running sums saved after every grid point; an existing file is resumed")
    p_ems.add_argument("--out", required=True, help="EMS file to write (.safetensors)")
    p_ems.add_argument("--quiet", action="store_true", help="no progress bars")
    p_ems.set_defaults(func=cmd_calibrate_ems)
