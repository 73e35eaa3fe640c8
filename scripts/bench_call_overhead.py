#!/usr/bin/env python
"""Host time of one ``FewstepPipeline`` call outside its denoising steps, with and without the cached execution
device, measured in one run.

The pipelines of ``bench_pipeline_cuda.py`` (SD1.5-shaped UNet and VAE, random weights; ``--tiny`` for small
ones) run the static-step loop with the step itself replaced by a no-op, so what is timed is the per-call work
around the steps: input checks, prompt-embedding handling, ``set_timesteps``, the step tables, latents, and
``pipe._execution_device``. "uncached" asks diffusers for the execution device on every call (it walks every
submodule of every component for offloading hooks), "cached" is ``FewstepPipeline``'s default
(``fewstep/pipelines/execution_device.py``). CPU only (no GPU needed): the numbers are host time.

    PYTHONPATH=. python scripts/bench_call_overhead.py [--tiny] [--steps 8] [--calls 40] [--repeats 3] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_pipeline_cuda as pipelines  # noqa: E402
from _args import output_file  # noqa: E402

from fewstep._io import atomic_write  # noqa: E402
from fewstep.pipelines import graph_step  # noqa: E402
from fewstep.pipelines.fewstep_pipeline import FewstepPipeline  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny UNet/VAE instead of the SD1.5-shaped ones")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per call (no-ops; default 8)")
    ap.add_argument("--calls", type=int, default=40, help="timed calls per measurement (median; default 40)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating uncached/cached measurements (default 3)")
    ap.add_argument("--json", type=output_file, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    for name in ("steps", "calls", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup = pipelines.parse_args(["--device", "cpu", "--tiny"])
    setup.tiny = args.tiny
    _, _, graph, cell_kwargs, _ = pipelines._sd15_setup(setup, torch.device("cpu"))
    _, kwargs = cell_kwargs(1, args.steps, "latent")
    graph_step.StaticLoop._static_step = lambda self, run: run.engine.index.add_(1)  # time the call, not the step
    cached = FewstepPipeline._exec_device
    variants = {"uncached": lambda self: self.pipe._execution_device, "cached": cached}

    def median_ms() -> float:
        for _ in range(3):
            graph(**kwargs)
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            graph(**kwargs)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, method in variants.items():
            FewstepPipeline._exec_device = method
            results[name].append(median_ms())
    FewstepPipeline._exec_device = cached
    what = "tiny" if args.tiny else "SD1.5-shaped"
    print(f"host ms per call outside {args.steps} no-op steps ({what} modules, median of {args.calls} calls)")
    for name, values in results.items():
        print(f"  {name:>8}: " + "  ".join(f"{v:.2f}" for v in values))
    ratio = statistics.median(results["uncached"]) / statistics.median(results["cached"])
    print(f"  uncached / cached: {ratio:.2f}x")
    if args.json:
        out = {"modules": what, "steps": args.steps, "calls": args.calls, "repeats": args.repeats,
               "timed": "host ms per FewstepPipeline call outside no-op steps (median of calls)",
               "torch": torch.__version__, "ms_per_call": results, "uncached_over_cached": ratio}
        atomic_write(args.json, lambda p: p.write_text(json.dumps(out, indent=2) + "\n"))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
