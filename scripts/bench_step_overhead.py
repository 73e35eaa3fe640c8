#!/usr/bin/env python
"""Scheduler overhead per step: fewstep versus diffusers on the same configs, measured in one run.

fewstep compiles all coefficients in ``set_timesteps``; ``step`` is a handful of fused-free tensor ops.
diffusers recomputes alphas, sigmas and lambdas (and for UniPC solves a small linear system) every step.
The model is a no-op so only the scheduler is timed. Prints mean microseconds per step and the ratio.

    python scripts/bench_step_overhead.py [--device cuda] [--steps 20] [--repeats 20] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from _args import count, output_file  # noqa: E402 - scripts/ is on sys.path when run as a script
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from fewstep import samplers
from fewstep._io import atomic_write

PAIRS = [("ddim", DDIMScheduler, {"clip_sample": False}), ("dpm-solver++", DPMSolverMultistepScheduler, {}),
         ("unipc", UniPCMultistepScheduler, {})]


def time_loop(scheduler, x: torch.Tensor, steps: int) -> float:
    """Microseconds per step of one ``steps``-step loop of ``scheduler`` on a zero model output."""
    out = torch.zeros_like(x)
    scheduler.set_timesteps(steps, device=x.device)
    sample = x
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for t in scheduler.timesteps:
        sample = scheduler.step(out, t, sample).prev_sample
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e6


def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform reports."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=count(1), default=20, help="steps per timed loop (default 20)")
    parser.add_argument("--repeats", type=count(1), default=20, help="timed loops, the fastest reported (default 20)")
    parser.add_argument("--shape", default="4,4,64,64", help="latent shape (SD 1.5 at 512px: 4,4,64,64)")
    parser.add_argument("--json", type=output_file, default=None, help="also write the table to this JSON file")
    args = parser.parse_args()
    try:
        shape = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape takes comma-separated integers like 4,4,64,64, got {args.shape!r}")
    if not shape or any(v < 1 for v in shape):
        parser.error(f"--shape dimensions must be >= 1, got {args.shape!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible to torch; use --device cpu")
    x = torch.randn(shape, device=args.device)
    print(f"device {args.device}, latent {shape}, {args.steps} steps, best of {args.repeats}")
    print("| sampler | fewstep us/step | diffusers us/step | diffusers / fewstep |")
    print("| --- | ---: | ---: | ---: |")
    pairs = []
    for name, cls, kw in PAIRS:
        theirs = cls(**kw)
        pairs.append((name, cls, samplers.get(name).from_config(theirs.config), theirs))
    # the loops alternate (every scheduler once per round) and each keeps its fastest: a slower stretch of a shared
    # host then hits all of them alike instead of whichever ran during it
    best = {(name, side): float("inf") for name, *_ in pairs for side in ("ours", "theirs")}
    for _ in range(args.repeats):
        for name, _cls, ours, theirs in pairs:
            best[name, "ours"] = min(best[name, "ours"], time_loop(ours, x, args.steps))
            best[name, "theirs"] = min(best[name, "theirs"], time_loop(theirs, x, args.steps))
    rows = []
    for name, cls, _ours, _theirs in pairs:
        t_ours, t_theirs = best[name, "ours"], best[name, "theirs"]
        print(f"| {name} | {t_ours:.0f} | {t_theirs:.0f} | {t_theirs / t_ours:.2f}x |")
        rows.append({"sampler": name, "diffusers_class": cls.__name__, "fewstep_us_per_step": t_ours,
                     "diffusers_us_per_step": t_theirs, "diffusers_over_fewstep": t_theirs / t_ours})
    if args.json:
        device = torch.cuda.get_device_name(x.device) if x.is_cuda else _cpu_name()
        out = {"device": device, "shape": list(shape), "steps": args.steps, "repeats": args.repeats,
               "timed": "scheduler.step with a no-op model output, fastest loop", "torch": torch.__version__,
               "rows": rows}
        atomic_write(args.json, lambda p: p.write_text(json.dumps(out, indent=2) + "\n"))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
