#!/usr/bin/env python
"""W8A8 post-training quantization of ``digits-eps``: quality (Frechet distance, class accuracy) and CPU speed.

Quality, part ``calib``: full precision vs fake-quant W8A8 under each calibration recipe -- PTQ4DM's NDTC
vs Q-Diffusion's uniform steps, range-search metric L_p(2.4) / MSE / cosine / KL, shortcut splitting,
int8 vs fp8 grids -- at one sampler setting. Part ``samplers``: FP vs W8A8 (int8 run on the real
``torch._int_mm`` path, fp8 on ``torch._scaled_mm`` where the device has it, else fake-quant) with DDIM and
DPM-Solver++ at 10 and 20 NFE, with the library default (``conv_in`` / ``conv_out`` in float) or, with
``--all-layers``, every layer quantized. Every cell uses
the same per-sample seeds (paired comparison), CFG scale 3, and the same calibration settings except
the one varied. Part ``deviation``: RMSE of each variant's final samples against the full-precision ones
(same seeds), the direct fidelity measure. Part ``speed``: one UNet forward on the CPU in float32 vs the
int8 path vs fake-quant (every layer quantized), plus the per-layer policy's choice on this machine.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/bench_quant.py --out scripts/results_quant.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from fewstep import quant
from fewstep._io import atomic_write
from fewstep.bench.digits_eval import evaluate_digits
from fewstep.pipelines import load_default
from fewstep.pipelines.swap import swap_sampler

# label -> (calibration method, QuantConfig overrides). Cells without a "float" suffix quantize every layer
# (exclude=[] passed explicitly: the library default keeps conv_in and conv_out in float, quant.BOUNDARY_LAYERS)
ALL = {"exclude": []}
CALIB_CELLS = {
    "ndtc / lp2.4": ("ndtc", {**ALL}),
    "uniform / lp2.4": ("uniform", {**ALL}),
    "ndtc / mse": ("ndtc", {**ALL, "metric": "mse"}),
    "uniform / mse": ("uniform", {**ALL, "metric": "mse"}),
    "uniform / cosine": ("uniform", {**ALL, "metric": "cosine"}),
    "uniform / kl": ("uniform", {**ALL, "metric": "kl"}),
    "uniform / lp2.4 / split": ("uniform", {**ALL, "split_skip": True}),
    "ndtc / lp2.4 / split": ("ndtc", {**ALL, "split_skip": True}),
    "uniform / lp2.4 / fp8": ("uniform", {**ALL, "format": "fp8"}),
    "uniform / lp2.4 / conv_in+conv_out float": ("uniform", {"exclude": ["conv_in", "conv_out"]}),
    "ndtc / lp2.4 / conv_in+conv_out float": ("ndtc", {"exclude": ["conv_in", "conv_out"]}),
    # Q-Diffusion's proportions: every kept step sees all calibration trajectories (20 x more rows)
    "uniform-all / lp2.4": ("uniform-all", {**ALL}),
    "uniform-all / lp2.4 / conv_in+conv_out float": ("uniform-all", {"exclude": ["conv_in", "conv_out"]}),
}


def _calibrations(pipe, args, methods):
    out = {}
    for method in methods:
        calib_pipe = swap_sampler(pipe, args.calib_sampler)
        start = time.perf_counter()
        # "uniform": calib_samples network inputs spread over 20 kept steps (calib_samples / 20 trajectories);
        # "uniform-all": calib_samples trajectories, each recorded at all 20 kept steps
        scale = 20 if method == "uniform-all" else 1
        out[method] = quant.build_calibration_set(calib_pipe, num_samples=args.calib_samples * scale,
                                                  steps=args.calib_steps, method=method.split("-")[0],
                                                  seed=args.seed + 12345)
        print(f"calibration {method}: {len(out[method])} rows, {time.perf_counter() - start:.1f} s", flush=True)
    return out


def _evaluate(pipe, unet, classifier, sampler, steps, args) -> dict:
    pipe = swap_sampler(pipe, sampler)
    original = pipe.unet
    pipe.unet = unet
    try:
        start = time.perf_counter()
        q = evaluate_digits(pipe, classifier, num_per_class=args.num_per_class, steps=steps, seed=args.seed,
                            progress=False, guidance="cfg", guidance_scale=3.0)
        seconds = time.perf_counter() - start
    finally:
        pipe.unet = original
    return {"fd": q.fd, "accuracy": q.accuracy, "fd_floor": q.fd_floor, "num_samples": q.num_samples,
            "seconds": seconds}


def run_calib(pipe, classifier, args) -> list[dict]:
    cells = args.cells or ["full precision", *CALIB_CELLS]
    cals = _calibrations(pipe, args, sorted({CALIB_CELLS[c][0] for c in cells if c in CALIB_CELLS}))
    rows = []
    if "full precision" in cells:
        rows.append(dict(cell="full precision", sampler=args.sampler, steps=args.steps,
                         **_evaluate(pipe, pipe.unet, classifier, args.sampler, args.steps, args)))
        print(rows[-1], flush=True)
    for label in cells:
        if label == "full precision":
            continue
        method, overrides = CALIB_CELLS[label]
        start = time.perf_counter()
        qmodel = quant.quantize(pipe.unet, cals[method], quant.QuantConfig(**overrides))
        quant_seconds = time.perf_counter() - start
        row = dict(cell=label, sampler=args.sampler, steps=args.steps, quantize_seconds=quant_seconds,
                   **_evaluate(pipe, qmodel, classifier, args.sampler, args.steps, args))
        rows.append(row)
        print(row, flush=True)
    return rows


def run_samplers(pipe, classifier, args) -> list[dict]:
    cal = _calibrations(pipe, args, [args.default_calib])[args.default_calib]
    # the library default keeps conv_in / conv_out in float (quant.BOUNDARY_LAYERS); --all-layers quantizes every layer
    config = {"exclude": []} if args.all_layers else {}
    where = "all layers" if args.all_layers else "conv_in+conv_out float (default)"
    models = {}
    if not args.fp8_only:
        if not args.skip_fp:
            models["full precision"] = pipe.unet
        models[f"W8A8 int8 (real _int_mm path), {where}"] = quant.set_mode(
            quant.quantize(pipe.unet, cal, quant.QuantConfig(**config)), "int8")
    if args.with_fp8 or args.fp8_only:
        fp8 = quant.quantize(pipe.unet, cal, quant.QuantConfig(format="fp8", **config))
        # the real e4m3 GEMM (torch._scaled_mm) where this device has it -- CPU builds with the float8 kernel too
        real = quant.fp8_supported(pipe.device)
        path = "real _scaled_mm path" if real else "fake-quant"
        models[f"W8A8 fp8 ({path}), {where}"] = quant.set_mode(fp8, "fp8" if real else "fake")
    rows = []
    for sampler in args.sampler_set:
        for steps in (10, 20):
            for label, unet in models.items():
                row = dict(cell=label, calibration=args.default_calib, sampler=sampler, steps=steps,
                           **_evaluate(pipe, unet, classifier, sampler, steps, args))
                rows.append(row)
                print(row, flush=True)
    return rows


@torch.no_grad()
def run_deviation(pipe, args) -> list[dict]:
    """RMSE of the final samples of each quantized variant against the full-precision ones, same seeds:
    a direct fidelity measure (FD can move either way under small perturbations)."""
    from fewstep.bench.digits_eval import per_sample_noise

    cells = [c for c in (args.cells or list(CALIB_CELLS)) if c in CALIB_CELLS]
    cals = _calibrations(pipe, args, sorted({CALIB_CELLS[c][0] for c in cells}))
    n = args.deviation_samples
    labels = [i % 10 for i in range(n)]
    cfg = pipe.unet.config
    noise = per_sample_noise((cfg.in_channels, cfg.sample_size, cfg.sample_size), [args.seed + k for k in range(n)])
    rows = []
    for sampler, steps in ((args.sampler, args.steps), ("dpm-solver++", 20)):
        swap_sampler(pipe, sampler)
        original = pipe.unet

        def final(unet, steps=steps, original=original):
            pipe.unet = unet
            try:
                return pipe(labels, num_inference_steps=steps, guidance_scale=3.0, latents=noise,
                            output_type="latent").images.float()
            finally:
                pipe.unet = original

        reference = final(original)
        for label in cells:
            method, overrides = CALIB_CELLS[label]
            qmodel = quant.quantize(original, cals[method], quant.QuantConfig(**overrides))
            x = final(qmodel)
            rmse = float((x - reference).pow(2).mean().sqrt())
            rows.append({"cell": label, "sampler": sampler, "steps": steps, "rmse_vs_fp": rmse,
                         "rel_rmse": rmse / float(reference.pow(2).mean().sqrt()), "num_samples": n})
            print(rows[-1], flush=True)
    return rows


def _interleaved_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each callable, measured round-robin (the machine is shared: interleaving keeps
    load changes from favouring one variant)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _with_mode(model, mode, inputs):
    def run():
        quant.set_mode(model, mode)
        return model(**inputs)
    return run


@torch.no_grad()
def run_speed(pipe, args) -> dict:
    cal = quant.build_calibration_set(swap_sampler(pipe, args.calib_sampler), num_samples=64, steps=args.calib_steps,
                                      method="uniform", seed=args.seed)
    qmodel = quant.quantize(pipe.unet, cal, quant.QuantConfig(exclude=[]))  # every layer, as the recorded results
    out = {"threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "note": "shared 2-core machine, OMP_NUM_THREADS=1, interleaved medians",
           "unet_forward_ms": {}}
    for batch in args.speed_batches:
        idx = torch.arange(batch) % len(cal)
        inputs = {"sample": cal.sample[idx], "timestep": cal.timestep[idx], "class_labels": cal.class_labels[idx]}
        fns = {"float32": lambda inputs=inputs: pipe.unet(**inputs)}
        fns.update({mode: _with_mode(qmodel, mode, inputs) for mode in ("int8", "fake", "dequant")})
        row = _interleaved_ms(fns, args.repeats)
        row["float32_over_int8"] = row["float32"] / row["int8"]
        out["unet_forward_ms"][str(batch)] = row
        print(f"batch {batch}: {row}", flush=True)
    # GEMM only (the int8 kernel vs the float32 one, no quantize / im2col), shapes of this UNet's 3x3 convs
    gemm = {}
    for m, k, n in ((5120, 576, 64), (20480, 288, 32), (1280, 576, 64)):
        a, w = torch.randn(m, k), torch.randn(n, k)
        aq = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        row = _interleaved_ms({"float32": lambda a=a, w=w: a @ w.t(),
                               "int8": lambda aq=aq, wq=wq: torch._int_mm(aq, wq.t())}, args.repeats)
        gemm[f"{m}x{k}x{n}"] = {"float32_ms": row["float32"], "int8_ms": row["int8"],
                                "float32_over_int8": row["float32"] / row["int8"]}
    out["gemm_only"] = gemm
    print(gemm, flush=True)
    # the per-layer policy on this machine (candidates: real int8 vs 8-bit storage + float compute)
    batch = max(args.speed_batches)
    idx = torch.arange(batch) % len(cal)
    inputs = {"sample": cal.sample[idx], "timestep": cal.timestep[idx], "class_labels": cal.class_labels[idx]}
    report = quant.choose_modes(qmodel, inputs, candidates=("int8", "dequant"))
    chosen = [r.chosen for r in report]
    out["policy"] = {"batch": batch, "layers": len(report), "int8": chosen.count("int8"),
                     "dequant": chosen.count("dequant")}
    policy_modes = {r.name: r.chosen for r in report}

    def run_policy():
        quant.set_mode(qmodel, policy_modes)
        return qmodel(**inputs)

    row = _interleaved_ms({"float32": lambda: pipe.unet(**inputs), "policy": run_policy}, args.repeats)
    out["policy"].update({"unet_forward_ms": row["policy"], "float32_ms": row["float32"]})
    print(out["policy"], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["calib", "samplers", "deviation", "speed"],
                        choices=["calib", "samplers", "deviation", "speed"],
                        help="parts to run, in this order (default calib samplers deviation speed)")
    parser.add_argument("--deviation-samples", type=int, default=100,
                        help="deviation part: samples compared with full precision (default 100)")
    parser.add_argument("--cells", nargs="+", default=None, choices=["full precision", *CALIB_CELLS],
                        help="calib and deviation parts: cells to run (default all)")
    parser.add_argument("--num-per-class", type=int, default=50,
                        help="calib and samplers parts: samples per digit class (default 50)")
    parser.add_argument("--sampler", default="ddim",
                        help="sampler of the calib part and the deviation part's first run (default ddim)")
    parser.add_argument("--steps", type=int, default=10,
                        help="steps of the calib part and the deviation part's first run (default 10)")
    parser.add_argument("--calib-sampler", default="ddim", help="sampler of the calibration runs (default ddim)")
    parser.add_argument("--calib-steps", type=int, default=20, help="steps of the calibration runs (default 20)")
    parser.add_argument("--calib-samples", type=int, default=256,
                        help="network inputs per calibration set (uniform-all: 20x as many) (default 256)")
    parser.add_argument("--default-calib", choices=["ndtc", "uniform"], default="uniform",
                        help="samplers part: calibration method (default uniform)")
    parser.add_argument("--speed-batches", type=int, nargs="+", default=[20, 200],
                        help="speed part: batch sizes of the timed UNet forward (default 20 200)")
    parser.add_argument("--repeats", type=int, default=15,
                        help="speed part: interleaved timed runs per variant, median reported (default 15)")
    parser.add_argument("--with-fp8", action="store_true", help="samplers part: also the fp8 grid (fake-quant)")
    parser.add_argument("--fp8-only", action="store_true", help="samplers part: only the fp8 grid")
    parser.add_argument("--all-layers", action="store_true",
                        help="samplers part: quantize every layer (exclude=[]) instead of the default, which keeps "
                             "conv_in and conv_out in float")
    parser.add_argument("--sampler-set", nargs="+", default=["ddim", "dpm-solver++"],
                        help="samplers part: samplers to run (default ddim dpm-solver++)")
    parser.add_argument("--skip-fp", action="store_true",
                        help="samplers part: no full-precision rows (they do not depend on the quantization)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the sample noise (sample k: seed + k) and the calibration sets (default 0)")
    parser.add_argument("--out", default="scripts/results_quant.json",
                        help="results JSON, merged and rewritten after each part (default scripts/results_quant.json)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    pipe = load_default("digits-eps", sampler="ddim")
    classifier = load_default("digits-classifier")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "parts")}
    for part in args.parts:
        start = time.perf_counter()
        if part == "calib":
            results["calib"] = run_calib(pipe, classifier, args)
        elif part == "samplers":
            results["samplers"] = run_samplers(pipe, classifier, args)
        elif part == "deviation":
            results["deviation"] = run_deviation(pipe, args)
        else:
            results["speed"] = run_speed(pipe, args)
        print(f"part {part}: {time.perf_counter() - start:.0f} s", flush=True)
        atomic_write(out, lambda p: p.write_text(json.dumps(results, indent=1) + "\n"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
