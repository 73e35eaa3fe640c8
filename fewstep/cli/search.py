"""``fewstep search``: S^3 solver-schedule search."""

from __future__ import annotations

import argparse
import os

from .. import __version__
from .._io import check_writable
from ._common import (
    UsageError,
    _fraction,
    _positive_int,
    _same_file,
    _seed,
    int_at_least,
    refuse_output_over_inputs,
)


def cmd_search(args: argparse.Namespace) -> int:
    out = check_writable(args.out, "--out")
    if out.suffix.lower() != ".json":
        raise UsageError(f"--out {args.out!r} must end in .json")
    if args.state is not None:
        check_writable(args.state, "--state")
    if args.model not in ("analytic", "digits-eps"):
        raise UsageError(f"--model {args.model!r} is not searchable here; available: analytic, digits-eps")
    if args.metric == "mse" and args.model != "digits-eps":
        raise UsageError("--metric mse is for --model digits-eps (the analytic model uses its exact solution)")
    digits_only = [flag for flag, value in (("--guidance-scale", args.guidance_scale),
                                            ("--num-per-class", args.num_per_class)) if value is not None]
    if digits_only and args.model != "digits-eps":
        raise UsageError(f"{', '.join(digits_only)}: for --model digits-eps (the analytic model has no classes or "
                         "guidance)")
    args.guidance_scale = 3.0 if args.guidance_scale is None else args.guidance_scale
    args.num_per_class = 20 if args.num_per_class is None else args.num_per_class
    from .._dist import check_same_on_all_processes, is_main_process
    from ..search import SearchSpace, search
    from ..search.objectives import (
        HELD_OUT_SEED,
        SEARCH_CLASSES,
        AnalyticObjective,
        DigitsMSEObjective,
        DigitsObjective,
    )

    # the search's per-sample seeds are 0 .. classes x per-class - 1: they must not reach the held-out seeds
    most = HELD_OUT_SEED // len(SEARCH_CLASSES)
    if args.model == "digits-eps" and args.num_per_class > most:
        raise UsageError(f"--num-per-class {args.num_per_class} is too many: the search's seeds (one per sample, "
                         f"{len(SEARCH_CLASSES)} classes) must stay below the held-out evaluation's first seed "
                         f"{HELD_OUT_SEED}; use at most {most}")
    from ..search.s3_search import check_state_early

    # every process of a distributed launch must run the same search, checked before anything that may fail on one
    # process only (files read, the state file) and before the objective's setup, which already gathers samples
    check_same_on_all_processes({k: v for k, v in sorted(vars(args).items())
                                 if isinstance(v, (str, int, float, bool, list, type(None))) and k != "quiet"},
                                "search arguments")

    if args.ems not in ("auto", "none") and args.model != "digits-eps":
        raise UsageError("--ems FILE is for --model digits-eps (the analytic model has no EMS file)")
    ems = None if args.ems == "none" else args.ems
    state = args.state or str(out) + ".state.json"
    if _same_file(state, out):  # resolved: `./x`, a link to --out
        raise UsageError(f"--state {args.state!r} is the --out file; the state needs a file of its own")
    # the state is rewritten during the search and --out at its end: neither may be a file the search reads
    inputs = [("--init", path) for path in args.init or []]
    if ems not in (None, "auto"):
        inputs.append(("--ems", ems))
    refuse_output_over_inputs("--out", args.out, *inputs)
    refuse_output_over_inputs("--state", state, *inputs)
    # the files of --init before the objective is built: one searched for another model is refused now
    initial = [_load_init_schedule(path, args.model) for path in args.init or []]
    metric_name = (AnalyticObjective if args.model == "analytic"
                   else DigitsMSEObjective if args.metric == "mse" else DigitsObjective).name
    # before the objective is built (a reference solve takes minutes): a state of another search is refused now
    check_state_early(state, {"nfe": args.nfe, "seed": args.seed, "metric": metric_name,
                              "use_predictor": not args.no_predictor, "afs": args.afs is not None})
    if args.model == "analytic":
        objective = AnalyticObjective()
    elif args.metric == "mse":
        objective = DigitsMSEObjective(guidance_scale=args.guidance_scale, num_per_class=args.num_per_class, ems=ems)
    else:
        objective = DigitsObjective(guidance_scale=args.guidance_scale, num_per_class=args.num_per_class, ems=ems)
    space = SearchSpace(objective.noise_schedule, args.nfe, ems=objective.ems, afs=args.afs is not None,
                        afs_mean=objective.data_mean() if args.afs == "average_x0" else None)
    initial = [_check_init_noise_schedule(path, sched, objective) for path, sched in zip(args.init or [], initial)]
    identity = {**objective.metadata(), "metric": objective.name}
    result = search(objective, space, args.budget, seed=args.seed, use_predictor=not args.no_predictor,
                    state_path=state, progress=not args.quiet, initial=initial, identity=identity)
    best, value = result.best
    best.metadata.update(objective.metadata())
    best.metadata.update({"metric": objective.name, "value": value, "evaluations": len(result.evaluated),
                          "predictor": not args.no_predictor, "seed": args.seed, "version": __version__})
    if initial:  # the warm-start files, by name, so the search can be repeated
        best.metadata["init"] = [os.path.basename(p) for p in args.init]
    if is_main_process():  # under accelerate launch: one writer
        best.save(out)
        print(f"wrote {out} (NFE {args.nfe}, best {objective.name} metric {value:.4g} after "
              f"{len(result.evaluated)} evaluations; resumable state in {state})")
    return 0


def _load_init_schedule(path: str, model: str):
    """``fewstep search --init FILE``: a schedule file searched for the same model (its name, where the file
    records one; the noise schedule is compared by ``_check_init_noise_schedule`` once the objective is built)."""
    from ..solvers.s3 import SolverSchedule

    try:
        schedule = SolverSchedule.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--init {path!r}: {exc}") from None
    found = schedule.metadata.get("model")
    if found is not None and found != model:
        raise UsageError(f"--init {path!r} was searched for another model ({found}); this search is for --model "
                         f"{model}: warm-start from a schedule file of {model}")
    return schedule


def _check_init_noise_schedule(path: str, schedule, objective):
    """An ``--init`` schedule searched on another noise schedule is refused (one that records none passes)."""
    expected = objective.metadata()["noise_schedule"]
    found = schedule.metadata.get("noise_schedule")
    if found is not None and found != expected:
        raise UsageError(f"--init {path!r} was searched for another model (noise schedule {found}, "
                         f"this search: {expected})")
    return schedule


def add_parser(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser("search", help=help_text)
    p.add_argument("--model", default="digits-eps", help="analytic or digits-eps (default digits-eps)")
    p.add_argument("--nfe", type=int_at_least(2), required=True, help="number of model evaluations (>= 2)")
    p.add_argument("--budget", type=_positive_int, default=40, help="schedules to evaluate (default 40)")
    p.add_argument("--guidance-scale", type=_fraction, default=None, help="CFG scale for digits-eps (default 3)")
    p.add_argument("--num-per-class", type=_positive_int, default=None,
                   help="digits-eps samples per class (7 classes; default 20)")
    p.add_argument("--metric", choices=["fd", "mse"], default="fd",
                   help="digits-eps: Frechet distance, or MSE to a 200-step reference solve (default fd)")
    p.add_argument("--ems", default="auto",
                   help="DPM-Solver-v3 tables that make 'ems' a prediction type of the search: auto (the model's "
                        "shipped EMS, if any; the default), none, or an EMS file (digits-eps)")
    p.add_argument("--afs", nargs="?", const="zero_x0", default=None, choices=["zero_x0", "average_x0"],
                   help="let candidates take the analytical first step at t_max (no model call) and spend the NFE "
                        "after it: x0 = 0 (zero_x0, the default) or the data's mean image (average_x0)")
    p.add_argument("--no-predictor", action="store_true", help="plain evolution (no performance predictor)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the search's random draws (candidate schedules and their mutations; default 0)")
    p.add_argument("--init", action="append", metavar="SCHEDULE",
                   help="warm start from a schedule file of this model, any NFE (steps are inserted or removed "
                        "to fit); repeatable")
    p.add_argument("--state", default=None, help="resumable search state (default: OUT.state.json)")
    p.add_argument("--out", required=True, help="where to write the best schedule (.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_search)
