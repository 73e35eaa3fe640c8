"""``fewstep bench``: the sampler x NFE x guidance x model grid runner and the analytic error table."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .. import __version__
from .._io import atomic_write, check_creatable_dir, check_writable, first_missing_dir
from ._common import (
    UsageError,
    _guidance_list,
    _int_list,
    _model_list,
    _name_list,
    _positive_int,
    _read_prompts,
    _seed,
)

#: which kinds of --model each option applies to (a flag no listed model uses is a usage error, not ignored)
APPLIES = {
    "guidance": ("digits", "pipeline"), "num_per_class": ("digits", "pipeline"), "classes": ("digits",),
    "batch_size": ("digits", "pipeline"), "reference_steps": ("digits", "pipeline"),
    "features": ("digits", "pipeline"), "inception_weights": ("digits", "pipeline"),
    "reference_images": ("pipeline",), "prompts": ("pipeline",), "image_size": ("pipeline",),
    "schedule": ("analytic",), "num_samples": ("analytic",), "dim": ("analytic",),
}  # fmt: skip
#: the metrics each kind of model reports (what --plot can draw)
KIND_METRICS = {"analytic": ("rmse", "fd"), "digits": ("fd", "accuracy", "mse"), "pipeline": ("mse", "fd")}
KIND_NAMES = {"analytic": "--model analytic", "digits": "the digits models", "pipeline": "pipeline directories"}
#: defaults of the options that apply to the analytic model only (None on the parser, to see what was given)
ANALYTIC_DEFAULTS = {"schedule": "vp", "num_samples": 2000, "dim": 2}


def _model_kind(model: str) -> str:
    """``analytic``, ``digits`` (an embedded digits model, by name) or ``pipeline`` (anything else: a directory,
    whatever it is called, e.g. a folder named ``digits-sd``)."""
    from ..pipelines.defaults import DEFAULT_MODELS

    return "analytic" if model == "analytic" else "digits" if model in DEFAULT_MODELS else "pipeline"


def _refuse_inapplicable(args: argparse.Namespace, kinds: set[str]) -> None:
    """Refuse options that none of the requested models uses (they would be ignored silently)."""
    for key, where in APPLIES.items():
        if getattr(args, key) is not None and not kinds & set(where):
            users = " and ".join(KIND_NAMES[k] for k in where)
            raise UsageError(f"--{key.replace('_', '-')} applies to {users}, not --model {','.join(args.model)}")


def _check_applicable(args: argparse.Namespace, kinds: set[str]) -> None:
    """Refuse options that none of the requested models uses, and a --plot metric none of them reports."""
    _refuse_inapplicable(args, kinds)
    pipeline_fd = args.features == "inception"
    available = [m for k in sorted(kinds) for m in KIND_METRICS[k] if m != "fd" or k != "pipeline" or pipeline_fd]
    if args.plot is None:  # default: FD where a model reports it, else the first metric reported
        args.plot = "fd" if "fd" in available else available[0]
    elif args.plot != "none" and args.plot not in available:
        raise UsageError(f"--plot {args.plot}: --model {','.join(args.model)} reports {sorted(set(available))}; "
                         "plot one of those (pipeline directories report fd only with --features inception)")


def _fill_analytic_defaults(args: argparse.Namespace) -> None:
    """The analytic options' defaults, once the check of what was given has run."""
    for key, value in ANALYTIC_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def cmd_bench(args: argparse.Namespace) -> int:
    models = args.model
    kinds = {_model_kind(m) for m in models}
    digits_only = ("guidance", "num_per_class", "classes", "batch_size", "reference_steps", "features",
                   "inception_weights", "reference_images")
    if models == ["analytic"] and args.out is None:  # the analytic table, as before the grid runner
        _refuse_inapplicable(args, kinds)
        if args.plot is not None:
            raise UsageError("--plot is for a grid run (--out DIR); the analytic table is printed")
        if args.cache_dir is not None:
            raise UsageError("--cache-dir is for a grid run (--out DIR); the analytic table caches nothing")
        _fill_analytic_defaults(args)
        return _bench_analytic_table(args)
    if args.out is None:
        raise UsageError(f"--model {','.join(models)} runs a benchmark grid: give --out DIR for its results")
    if args.json is not None:
        raise UsageError("--json is for the analytic table; a grid run writes results.json into --out")
    _check_applicable(args, kinds)
    _fill_analytic_defaults(args)
    check_creatable_dir(args.out, "--out")
    if args.cache_dir is not None:
        check_creatable_dir(args.cache_dir, "--cache-dir")
    _check_out_contents(args, uses_cache=bool(kinds - {"analytic"}))
    from ..bench.runner import RESULTS_FILES, BenchConfig, format_markdown, is_main_process, plot_results, run_grid

    defaults = {"guidance": [("cfg", 3.0)], "num_per_class": 20, "classes": list(range(10)), "batch_size": 250,
                "reference_steps": 200, "features": "digits-classifier", "inception_weights": None,
                "reference_images": None}
    options = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in digits_only}
    if "digits" in kinds and options["num_per_class"] * len(options["classes"]) < 2:
        raise UsageError(f"--num-per-class {options['num_per_class']} x --classes {len(options['classes'])}: the "
                         "digits metrics need at least 2 samples per cell")  # fmt: skip
    if kinds & {"digits", "pipeline"} and options["reference_steps"] <= max(args.steps):
        default = "" if args.reference_steps is not None else " (the default)"
        raise UsageError(f"--reference-steps {options['reference_steps']}{default}: the many-step reference solve "
                         f"needs more steps than the largest --steps ({max(args.steps)})")  # fmt: skip
    options["feature_extractor"] = options.pop("features")
    if options["inception_weights"] is not None and options["feature_extractor"] != "inception":
        raise UsageError("--inception-weights needs --features inception")
    prompts = _read_prompts(args.prompts) if args.prompts is not None else None
    config = BenchConfig(models=models, samplers=args.samplers, steps=args.steps, schedule=args.schedule,
                         num_samples=args.num_samples, dim=args.dim, seed=args.seed, prompts=prompts,
                         image_size=args.image_size, **options)
    # the topmost folder each of --out and --cache-dir would create (`nest` of nest/a/b when nest is new)
    created = [d for d in (first_missing_dir(args.out), args.cache_dir and first_missing_dir(args.cache_dir)) if d]
    try:
        # scales that print alike are refused across a resume too (README), not only within this run
        rows = run_grid(config, args.out, cache_dir=args.cache_dir, progress=not args.quiet,
                        refuse_near_duplicates=True)
    except BaseException:
        # a run that failed before writing a file leaves no (empty) folders behind; the main process removes them
        # (another process of a distributed launch would race it: a folder gone between its look and its removal)
        for d in created if is_main_process() else ():
            if d.is_dir() and not any(f.is_file() for f in d.rglob("*")):
                shutil.rmtree(d, ignore_errors=True)
        raise
    if not is_main_process():  # under `accelerate launch`, one process reports
        return 0
    print(format_markdown(rows))
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


def _check_out_contents(args: argparse.Namespace, uses_cache: bool) -> None:
    """What the run will write into --out must be writable there, checked before any cell runs (not found out after
    the work is done): results.json/.csv/.md and the plot must not be directories, devices or broken links, and the
    default cache folder (OUT/cache, without --cache-dir; ``uses_cache``: a model of the run caches) no file."""
    from ..bench.runner import RESULTS_FILES

    out = Path(args.out)
    names = [*RESULTS_FILES.values()] + ([f"{args.plot}_vs_nfe.png"] if args.plot != "none" else [])
    for name in names:
        path = out / name
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise UsageError(f"--out {args.out!r}: {str(path)!r} exists and is not a regular file (a directory, "
                             "device or broken link); remove it or choose another --out")
    cache = out / "cache"
    if uses_cache and args.cache_dir is None and (cache.exists() or cache.is_symlink()) and not cache.is_dir():
        raise UsageError(f"--out {args.out!r}: its cache folder {str(cache)!r} exists and is not a directory; remove "
                         "it or give --cache-dir")



def _bench_analytic_table(args: argparse.Namespace) -> int:
    """The analytic error table (and ``--json``). Under a distributed launch (``torchrun``) every process computes
    it, but only the main process prints and writes (the others return 0 silently)."""
    to_stdout = args.json == "-"  # JSON on stdout for a pipe; the table then goes to stderr
    if args.json is not None and not args.json.strip():
        raise UsageError(f"--json must be a file path or '-' (stdout), got {args.json!r}")
    if args.json and not to_stdout:
        check_writable(args.json, "--json")
    from .._dist import is_main_process
    from ..bench.analytic_bench import format_table, rows_as_dicts, run_analytic_bench

    main = is_main_process()
    rows, meta = run_analytic_bench(
        samplers=args.samplers,
        steps=args.steps,
        schedule=args.schedule,
        num_samples=args.num_samples,
        dim=args.dim,
        seed=args.seed,
        progress=not args.quiet and main,
    )
    if not main:  # one process reports: the table once, one writer of --json
        return 0
    print(format_table(rows, meta), file=sys.stderr if to_stdout else sys.stdout)
    if args.json:
        payload = {"meta": meta, "rows": rows_as_dicts(rows), "version": __version__}
        if to_stdout:
            print(json.dumps(payload, indent=2))
        else:
            atomic_write(args.json, lambda p: p.write_text(json.dumps(payload, indent=2) + "\n"))
            print(f"wrote {args.json}")
    return 0


def add_parser(sub: argparse._SubParsersAction, help_text: str) -> None:
    """The ``bench`` subcommand."""
    p_bench = sub.add_parser("bench", help=help_text)
    p_bench.add_argument("--model", type=_model_list, default=["analytic"],
                         help="comma-separated models: analytic, digits-eps, digits-flow or diffusers pipeline "
                              "directories (default: analytic)")
    p_bench.add_argument("--steps", type=_int_list(1, "5,10,20"), default=[5, 10, 20],
                         help="comma-separated step counts (default 5,10,20)")
    # the default spelled out (the registry's standalone diffusion samplers; `bench --help` imports no torch)
    p_bench.add_argument("--samplers", type=_name_list, default=None,
                         help="comma-separated names (default: ddim, dpm-solver++, unipc, hb, ghvb, dc-solver; grid "
                              "runs add dpm-solver-v3 when every --model ships its EMS (digits-eps, digits-flow), the "
                              "analytic table flow-euler with --schedule flow; s3 runs only when named)")
    p_bench.add_argument("--guidance", type=_guidance_list, default=None, metavar="RULE:SCALE,...",
                         help="digits models and pipeline directories: comma-separated guidance settings, e.g. "
                              "cfg:3,cfg++:0.6,apg:7.5 (default cfg:3)")
    p_bench.add_argument("--num-per-class", type=_positive_int, default=None,
                         help="digits models: samples per class; pipeline directories: per prompt (default 20)")
    p_bench.add_argument("--classes", type=_int_list(0, "0,1,2"), default=None,
                         help="digits models: comma-separated classes (default 0-9)")
    p_bench.add_argument("--batch-size", type=_positive_int, default=None,
                         help="digits models and pipeline directories: samples per pipeline call (default 250; "
                              "results do not depend on it)")
    p_bench.add_argument("--reference-steps", type=_positive_int, default=None,
                         help="digits models and pipeline directories: steps of the dpm-solver++ reference solve "
                              "for the MSE, more than the largest --steps (default 200)")
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
    p_bench.add_argument("--schedule", choices=["vp", "flow"], default=None,
                         help="analytic noise schedule (default vp)")
    p_bench.add_argument("--num-samples", type=_positive_int, default=None,
                         help="analytic samples per cell (default 2000)")
    p_bench.add_argument("--dim", type=_positive_int, default=None,
                         help="dimension of the analytic mixture (default 2)")
    p_bench.add_argument("--seed", type=_seed, default=0,
                         help="seed of the mixture / the first sample's noise (default 0)")
    p_bench.add_argument("--out", default=None, metavar="DIR",
                         help="grid run: write results.json/.csv/.md (+ plot) here; re-runs skip finished cells")
    p_bench.add_argument("--cache-dir", default=None,
                         help="where reference statistics and solves are cached (default OUT/cache)")
    p_bench.add_argument("--plot", choices=["fd", "mse", "rmse", "accuracy", "none"], default=None,
                         help="grid run: metric to plot versus NFE into OUT/METRIC_vs_nfe.png (needs matplotlib; "
                              "default fd, or mse for pipeline directories without --features inception)")
    p_bench.add_argument("--json", default=None,
                         help="analytic table: also write the results as JSON to this path ('-': to stdout, the "
                              "table to stderr)")
    p_bench.add_argument("--quiet", action="store_true", help="no progress bar")
    p_bench.set_defaults(func=cmd_bench)
