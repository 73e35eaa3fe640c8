"""The ``fewstep`` command line: ``fewstep list``, ``fewstep generate`` and ``fewstep bench``.

Usage errors (bad flags or values) print one line to stderr and exit with code 2; output files are
written atomically, so a failed run leaves none behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

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
    unknown = [v for v in values if v not in sampler_registry.names()]
    if not values or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown sampler(s) {unknown or text!r}; available: {', '.join(sampler_registry.names())}"
        )
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
    from . import guidance

    guidance.make(args.guidance, args.guidance_scale)  # validate the rule's parameters before loading a model
    pipe = load_model(args.model, args.sampler, device=args.device, dtype=args.dtype)
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
    )
    grid = image_grid(result.images)
    atomic_write(out, lambda p: grid.save(p, format="PNG"))
    print(
        f"wrote {out} ({len(result.images)} images, sampler {args.sampler}, NFE {result.nfe}"
        f"{'' if args.guidance == 'cfg' and args.guidance_scale == 1.0 else f' x2 ({args.guidance})'}, "
        f"{result.seconds:.2f} s)"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.model != "analytic":
        raise UsageError(f"--model {args.model!r} is not available yet; available: analytic")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewstep", description="Fast diffusion sampling on top of diffusers.")
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_list = sub.add_parser("list", help="list the registered samplers")
    p_list.set_defaults(func=cmd_list)

    p_gen = sub.add_parser("generate", help="generate images with a fewstep sampler into a PNG grid")
    p_gen.add_argument("--model", default="digits-eps",
                       help="embedded model (digits-eps, digits-flow), a local pipeline directory or a hub id")
    p_gen.add_argument("--sampler", type=_sampler_name, default="unipc", help="registered sampler (fewstep list)")
    p_gen.add_argument("--steps", type=_positive_int, default=10, help="number of sampler steps (default 10)")
    p_gen.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    p_gen.add_argument("--num-images", type=_positive_int, default=10, help="images to generate (default 10)")
    p_gen.add_argument("--class", dest="classes", type=_int_list(0, "3,7"), default=None,
                       help="comma-separated class ids for class-conditional models (default: cycle 0-9)")
    p_gen.add_argument("--prompt", default=None, help="text prompt for text-to-image pipelines")
    p_gen.add_argument("--guidance", type=_guidance_name, default="cfg",
                       help="guidance rule: cfg, cfg++ (scale in [0, 1]) or apg (default cfg)")
    p_gen.add_argument("--guidance-scale", type=_finite_float, default=None,
                       help="scale of the guidance rule (default: cfg 3, cfg++ 0.6, apg 7.5)")
    p_gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p_gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p_gen.add_argument("--out", default="samples.png", help="output PNG grid (default samples.png)")
    p_gen.add_argument("--quiet", action="store_true", help="no progress bar")
    p_gen.set_defaults(func=cmd_generate)

    p_bench = sub.add_parser("bench", help="error versus NFE of samplers")
    p_bench.add_argument("--model", default="analytic", help="model to benchmark (default: analytic)")
    p_bench.add_argument("--steps", type=_int_list(1, "5,10,20"), default=[5, 10, 20],
                         help="comma-separated step counts")
    p_bench.add_argument("--samplers", type=_name_list, default=None, help="comma-separated names (default: all)")
    p_bench.add_argument("--schedule", choices=["vp", "flow"], default="vp", help="analytic noise schedule")
    p_bench.add_argument("--num-samples", type=_positive_int, default=2000, help="samples per cell")
    p_bench.add_argument("--dim", type=_positive_int, default=2, help="dimension of the analytic mixture")
    p_bench.add_argument("--seed", type=int, default=0, help="seed of the mixture and the initial noise")
    p_bench.add_argument("--json", default=None, help="also write the results as JSON to this path")
    p_bench.add_argument("--quiet", action="store_true", help="no progress bar")
    p_bench.set_defaults(func=cmd_bench)
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
