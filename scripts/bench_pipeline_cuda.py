#!/usr/bin/env python
"""FewstepPipeline's CUDA-graph mode vs its eager loop vs the stock diffusers pipeline, wall time per image.

An SD1.5-shaped ``UNet2DConditionModel`` with random weights (speed only) in fp16, text-to-image with random
prompt embeddings (no text encoder is timed), CFG on both branches in one batched UNet call per step, at 8 and
20 NFE and batch 1, 2, 8. Three pipelines over the same modules, measured in one run:

* ``graph``: ``FewstepPipeline.from_pipe(pipe, scheduler=<fewstep sampler>, cuda_graph=True)``: one denoising
  step captured once (first call per shape), then replayed for every step;
* ``eager``: the same FewstepPipeline without the graph;
* ``stock``: ``StableDiffusionPipeline`` with diffusers' own scheduler of the same method (``--sampler``:
  dpm-solver++ -> DPMSolverMultistepScheduler, unipc -> UniPCMultistepScheduler, ddim -> DDIMScheduler).

``--model digits`` runs the same three on the embedded ``digits-eps`` model (float32, CFG 3): "stock" is then its
``ClassConditionalPipeline`` with diffusers' scheduler of the method (the loop a user of the digits models gets
without fewstep's solvers), eager and graph ``FewstepPipeline`` around it; a tiny UNet, so launch-bound.

Timed with ``output_type="latent"`` by default (the denoising loop; ``--decode`` adds the VAE decode to all
three), after ``--warmup`` untimed calls per cell (they include the capture), median of ``--repeats`` runs.
Also checks that graph and eager images agree (decoded, fp16 tolerance ``--tol``).

    PYTHONPATH=. python scripts/bench_pipeline_cuda.py --out scripts/results_pipeline_cuda.json

Needs a CUDA GPU; ``--device cpu --tiny`` runs the same logic on a tiny UNet on the CPU (a smoke test: the
"graph" column is then the uncaptured static step, and its timings mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _args, also when imported by path (tests)

from _args import output_file, positive_float  # noqa: E402 - scripts/ is on sys.path when run as a script

from fewstep.pipelines import FewstepPipeline  # noqa: E402

SD15_SCHEDULER = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
}  # fmt: skip
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)  # fmt: skip
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)  # fmt: skip
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
    cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip
TINY_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
    sample_size=8, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
)  # fmt: skip
STOCK = {"dpm-solver++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler}
TOKENS = 77
#: issue 10's goal: graph mode at least this much faster than stock diffusers at batch 1-2
TARGET = 2.5


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd15", choices=["sd15", "digits"],
                    help="sd15: SD1.5-shaped UNet, random weights, fp16 (the issue's benchmark); digits: the embedded "
                         "digits-eps model, float32 (stock = its pipeline with diffusers' scheduler)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="device to run on; cpu is a smoke test, with --tiny or --model digits only (default cuda)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny UNet/VAE (smoke test; --device cpu needs it or --model digits)")
    ap.add_argument("--steps", default="8,20", help="comma-separated NFE (default 8,20)")
    ap.add_argument("--batches", default="1,2,8", help="comma-separated batch sizes (default 1,2,8)")
    ap.add_argument("--sampler", default="dpm-solver++", choices=sorted(STOCK),
                    help="fewstep sampler; stock runs diffusers' scheduler of the same method (default dpm-solver++)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: 7.5 sd15, 3 digits)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per cell, median reported (default 5)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed calls per cell before timing, graph capture included (default 2)")
    ap.add_argument("--decode", action="store_true", help="time the VAE decode too (output_type='np')")
    ap.add_argument("--compile", default=None, choices=["default", "max-autotune-no-cudagraphs"],
                    help="torch.compile the UNet of both fewstep pipelines (eager and graph) in this mode; stock "
                         "diffusers stays uncompiled (default: no compilation)")
    ap.add_argument("--channels-last", action="store_true",
                    help="put the shared UNet in channels_last memory format (diffusers' speed recipe; all three "
                         "pipelines run it)")
    ap.add_argument("--fuse-qkv", action="store_true",
                    help="fuse the shared UNet's attention q/k/v projections (pipe.fuse_qkv_projections(); all three "
                         "pipelines run it)")
    ap.add_argument("--tol", type=positive_float, default=1e-2, help="max |graph - eager| on [0, 1] images (fp16)")
    ap.add_argument("--out", type=output_file, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    try:
        args.steps = [int(s) for s in args.steps.split(",")]
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--steps and --batches take comma-separated integers, got {args.steps!r} / {args.batches!r}")
    if any(s < 1 for s in args.steps) or any(b < 1 for b in args.batches):
        ap.error(f"--steps and --batches must be >= 1, got {args.steps} / {args.batches}")
    if args.repeats < 1 or args.warmup < 0:
        ap.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} / {args.warmup}")
    if args.device == "cpu" and not (args.tiny or args.model == "digits"):
        ap.error("--device cpu runs only with --tiny or --model digits (a smoke test of the benchmark's logic)")
    if args.fuse_qkv and args.model == "digits":
        ap.error("--fuse-qkv needs --model sd15 (the digits UNet2DModel has no fuse_qkv_projections)")
    if args.guidance_scale is None:
        args.guidance_scale = 3.0 if args.model == "digits" else 7.5
    return args


def require_device(name: str) -> torch.device:
    """The device to run on, or exit with a one-line reason (no CPU fallback for the real benchmark)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench_pipeline_cuda.py needs a CUDA GPU (none visible to torch); `--device cpu --tiny` (or `--device cpu "
            "--model digits`) only smoke-tests its logic"
        )
    return torch.device(name)


def build(args, device: torch.device) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = UNet2DConditionModel(**(TINY_UNET if args.tiny else SD15_UNET))
    vae = AutoencoderKL(**(TINY_VAE if args.tiny else SD15_VAE))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(device, dtype)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if args.fuse_qkv:
        pipe.fuse_qkv_projections(unet=True, vae=False)
    return pipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall seconds of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sd15_setup(args, device: torch.device):
    """The SD1.5-shaped pipelines: stock diffusers, fewstep eager, fewstep graph; per-cell call arguments."""
    pipe = build(args, device)
    dtype = pipe.unet.dtype
    dim = pipe.unet.config.cross_attention_dim
    scale = args.guidance_scale
    # dtype: diffusers' from_pipe would otherwise cast the shared UNet to float32 (for all three pipelines)
    stock = StableDiffusionPipeline.from_pipe(pipe, scheduler=STOCK[args.sampler].from_config(SD15_SCHEDULER),
                                              dtype=dtype)
    stock.set_progress_bar_config(disable=True)
    eager, graph = _fewstep_pair(pipe, args, device)
    if pipe.unet.dtype != dtype or pipe.vae.dtype != dtype:
        raise RuntimeError(f"building the pipelines changed the model dtype to {pipe.unet.dtype} (expected {dtype})")

    def cell_kwargs(batch: int, nfe: int, output_type: str) -> tuple[dict, dict]:
        g = torch.Generator("cpu").manual_seed(batch)
        pos, neg = (torch.randn(batch, TOKENS, dim, generator=g).to(device, dtype) for _ in range(2))
        kw = dict(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=nfe, output_type=output_type)
        return {**kw, "guidance_scale": scale}, kw

    meta = {"model": "tiny" if args.tiny else "SD1.5-shaped UNet, random weights", "dtype": dtype,
            "stock_scheduler": STOCK[args.sampler].__name__}  # fmt: skip
    return stock, eager, graph, cell_kwargs, meta


def _digits_setup(args, device: torch.device):
    """The embedded ``digits-eps`` model (float32): "stock" is its ``ClassConditionalPipeline`` with diffusers'
    own scheduler of the method, eager and graph are ``FewstepPipeline`` around it."""
    from fewstep import load_default
    from fewstep.pipelines import ClassConditionalPipeline

    pipe = load_default("digits-eps").to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    stock = ClassConditionalPipeline.from_pipe(pipe, scheduler=STOCK[args.sampler].from_config(pipe.scheduler.config))
    eager, graph = _fewstep_pair(pipe, args, device)
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)

    def cell_kwargs(batch: int, nfe: int, output_type: str) -> tuple[dict, dict]:
        labels = [k % pipe.num_classes for k in range(batch)]
        latents = torch.randn(batch, *shape, generator=torch.Generator("cpu").manual_seed(batch)).to(device)
        out = "np" if output_type != "latent" else "latent"
        stock_kw = dict(class_labels=labels, num_inference_steps=nfe, guidance_scale=args.guidance_scale,
                        latents=latents, output_type=out, check_finite=False)  # fmt: skip
        return stock_kw, dict(class_labels=labels, num_inference_steps=nfe, latents=latents, output_type=out)

    meta = {"model": "digits-eps (embedded, 16x16)", "dtype": pipe.unet.dtype,
            "stock_scheduler": f"ClassConditionalPipeline + {STOCK[args.sampler].__name__}"}  # fmt: skip
    return stock, eager, graph, cell_kwargs, meta


def _fewstep_pair(pipe, args, device: torch.device):
    """FewstepPipeline around ``pipe``, eager and in graph mode (on the CPU: the static step, uncaptured)."""
    # static shapes: one specialised compile per batch size (dynamo would otherwise switch to dynamic shapes at the
    # second batch size, whose kernels are slower); eager and graph pipelines share the compiled UNet's cache
    compiled = {"compile": {"mode": args.compile, "dynamic": False}} if args.compile else {}
    rule = dict(scheduler=args.sampler, guidance="cfg", guidance_scale=args.guidance_scale, **compiled)
    eager = FewstepPipeline.from_pipe(pipe, **rule)
    if device.type == "cuda":
        graph = FewstepPipeline.from_pipe(pipe, cuda_graph=True, **rule)
    else:  # the static step uncaptured: the same code path, no graph
        graph = FewstepPipeline.from_pipe(pipe, **rule)
        graph._loop_mode = "static"
    return eager, graph


def run(args, save=None) -> dict:
    """Every cell, then the graph-vs-eager image check; ``save(partial_results)`` after each measured cell (a run
    cut short by a time limit keeps what it measured)."""
    device = require_device(args.device)
    setup = _digits_setup if args.model == "digits" else _sd15_setup
    stock, eager, graph, cell_kwargs, meta = setup(args, device)
    output_type = "np" if args.decode else "latent"
    cells = []
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": meta["model"], "dtype": str(meta["dtype"]).replace("torch.", ""), "sampler": args.sampler,
        "stock_scheduler": meta["stock_scheduler"],
        "guidance": f"cfg {args.guidance_scale}", "timed": "denoise + decode" if args.decode else
        "denoise (output_type=latent)",
        "graph_mode": "cuda graph" if device.type == "cuda" else "static step, uncaptured (cpu smoke test)",
        "compile": args.compile or "none",
        "channels_last": args.channels_last, "fuse_qkv": args.fuse_qkv,
        "cells": cells,
    }  # fmt: skip
    for nfe in args.steps:
        for batch in args.batches:
            stock_kw, kw = cell_kwargs(batch, nfe, output_type)
            calls = {
                "stock": lambda: stock(**stock_kw, generator=torch.Generator().manual_seed(0)),  # noqa: B023
                "eager": lambda: eager(**kw, generator=torch.Generator().manual_seed(0)),  # noqa: B023
                "graph": lambda: graph(**kw, generator=torch.Generator().manual_seed(0)),  # noqa: B023
            }
            secs = {}
            for name, fn in calls.items():
                try:
                    secs[name] = time_call(fn, device, args.warmup, args.repeats)
                except Exception as exc:  # noqa: BLE001 - record it, keep the other pipelines' and cells' timings
                    if name == "stock":
                        raise
                    results.setdefault("errors", {})[f"{name} nfe {nfe} batch {batch}"] = (
                        f"{type(exc).__name__}: {exc}"[:2000])
                    print(f"{name} (NFE {nfe}, batch {batch}) failed: {type(exc).__name__}: {exc}", flush=True)
            per_image = {k: v / batch for k, v in secs.items()}
            nan = float("nan")
            cells.append({
                "nfe": nfe, "batch": batch, "ms_per_image": {k: 1e3 * per_image.get(k, nan) for k in calls},
                "stock_over_graph": secs["stock"] / secs.get("graph", nan),
                "eager_over_graph": secs.get("eager", nan) / secs.get("graph", nan),
            })  # fmt: skip
            print(json.dumps(cells[-1]), flush=True)
            if save is not None:
                save(results)
    # agreement: decoded images of graph vs eager, same seed, first NFE and batch
    _, check_kw = cell_kwargs(args.batches[0], args.steps[0], "np")
    try:
        img_eager = eager(**check_kw, generator=torch.Generator("cpu").manual_seed(1)).images
        img_graph = graph(**check_kw, generator=torch.Generator("cpu").manual_seed(1)).images
        max_diff = float(np.abs(np.asarray(img_eager, dtype=np.float64) - np.asarray(img_graph, dtype=np.float64)
                                ).max())  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the timings above are kept
        results.setdefault("errors", {})["image check"] = f"{type(exc).__name__}: {exc}"[:2000]
        max_diff = float("nan")
    results.update(graph_vs_eager_image_max_abs_diff=max_diff, images_agree=bool(max_diff <= args.tol), tol=args.tol)
    return results


def report(results: dict) -> str:
    lines = [
        f"{results['model']} ({results['dtype']}) on {results['device']}; {results['sampler']} vs stock "
        f"{results['stock_scheduler']}; {results['guidance']}; timed: {results['timed']}; "
        f"graph: {results['graph_mode']}; fewstep UNet compiled: {results.get('compile', 'none')}; shared UNet "
        f"channels_last: {results.get('channels_last', False)}, fused qkv: {results.get('fuse_qkv', False)}",
        f"{'NFE':>4} {'batch':>5} {'stock ms/img':>13} {'eager ms/img':>13} {'graph ms/img':>13} "
        f"{'stock/graph':>12} {'eager/graph':>12}",
    ]
    for c in results["cells"]:
        ms = c["ms_per_image"]
        lines.append(
            f"{c['nfe']:>4} {c['batch']:>5} {ms['stock']:>13.2f} {ms['eager']:>13.2f} {ms['graph']:>13.2f} "
            f"{c['stock_over_graph']:>11.2f}x {c['eager_over_graph']:>11.2f}x"
        )
    small = [c["stock_over_graph"] for c in results["cells"] if c["batch"] <= 2 and c["stock_over_graph"] > 0]
    if small and results["graph_mode"] == "cuda graph":  # CPU smoke timings say nothing about the target
        met = "met" if min(small) >= TARGET else "NOT met"
        lines.append(f"target stock/graph >= {TARGET:g}x at batch 1-2: {met} (min {min(small):.2f}x)")
    for what, error in results.get("errors", {}).items():
        lines.append(f"FAILED {what}: {error}")
    verdict = "agree" if results["images_agree"] else "DISAGREE"
    lines.append(f"graph vs eager images: max |diff| = {results['graph_vs_eager_image_max_abs_diff']:.3g} "
                 f"({verdict} at tol {results['tol']:g})")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    save = None
    if args.out is not None:
        from fewstep._io import atomic_write

        def save(results: dict) -> None:
            atomic_write(args.out, lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))

    results = run(args, save)
    print(report(results))
    if save is not None:
        save(results)
    return results


if __name__ == "__main__":
    main()
