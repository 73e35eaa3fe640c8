#!/usr/bin/env python
"""8-bit execution on CUDA: bf16 vs int8 (``torch._int_mm``) vs fp8 e4m3 (``torch._scaled_mm``), per layer and
per UNet call, with static (calibrated) activation scales. Needs a CUDA GPU (fp8 needs SM >= 8.9).

Part ``layers``: one ``QuantLayer`` per shape from the research notes (SD1.5 / SDXL / Flux Linears, SD-sized
3x3 convs), every mode it supports, eager and ``torch.compile``-d; fp8 convs also on the Triton implicit-GEMM
kernel (``fewstep.quant.triton_conv``) where triton is installed, with its error against the fake-quant
reference; the bare GEMMs as well.
Part ``unet``: SD1.5- and SDXL-shaped ``UNet2DConditionModel`` with random weights (speed only), quantized
on a random calibration set (every layer, ``exclude=[]``, as the recorded results were measured; the library
default keeps conv_in / conv_out in bf16), the per-layer policy run at batch 2 (fp8 convs: im2col or
Triton), then compiled per-call latency at batch 1, 2, 8, 16 and weight memory, bf16 vs int8 vs fp8, as
ratios within one run. Results as JSON.

    PYTHONPATH=. python scripts/bench_quant_cuda.py --out scripts/results_quant_cuda.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fewstep import quant
from fewstep.quant.quantizers import act_qparams_from_range, weight_qparams
from fewstep.quant.triton_conv import triton_available

LINEARS = {  # name -> (M tokens, K in, N out)
    "SD1.5-512 ff1": (8192, 320, 2560),
    "SDXL-1024 L2 ff1": (8192, 640, 5120),
    "SDXL L3 ff1": (2048, 1280, 10240),
    "Flux qkv": (4608, 3072, 9216),
    "Flux mlp2": (4608, 12288, 3072),
}
CONVS = {  # name -> (batch, channels, size)
    "C320 @ 64^2": (2, 320, 64),
    "C640 @ 64^2": (2, 640, 64),
    "C1280 @ 32^2": (2, 1280, 32),
    "SDXL C640 @ 64^2, batch 16": (16, 640, 64),
}
UNETS = {
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 attention_head_dim=8, layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}
TEXT_TOKENS = 77
UNET_VARIANTS = ("int8", "int8-all", "fp8", "fp8-all", "fp8-all-triton")  # policy / every layer 8-bit / + Triton


def require_cuda() -> torch.device:
    """The CUDA device, or exit with a one-line reason (this benchmark has no CPU fallback)."""
    if not torch.cuda.is_available():
        raise SystemExit("bench_quant_cuda.py needs a CUDA GPU (none visible to torch); the CPU measurements are "
                         "scripts/bench_quant.py")
    return torch.device("cuda")


def cuda_ms(fn, repeats: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _layer(float_layer: nn.Module, x: torch.Tensor, fmt: str) -> quant.QuantLayer:
    amax = float(x.abs().max())
    acts = [act_qparams_from_range(-amax, amax, fmt)]
    return quant.QuantLayer(float_layer, [weight_qparams(float_layer.weight, fmt=fmt, search=False)], acts, fmt)


@torch.no_grad()
def bench_layers(device, args, rows: list) -> list[dict]:
    """Appends one row per layer shape (then per bare GEMM) to ``rows``, checkpointing after each."""
    cases = [(name, nn.Linear(k, n), torch.randn(m, k)) for name, (m, k, n) in LINEARS.items()]
    cases += [(name, nn.Conv2d(c, c, 3, padding=1), torch.randn(b, c, s, s)) for name, (b, c, s) in CONVS.items()]
    for name, float_layer, x in cases:
        float_layer = float_layer.to(device)
        x = x.to(device)
        xb = x.to(torch.bfloat16)
        bf16 = copy.deepcopy(float_layer).to(torch.bfloat16)
        row = {"layer": name, "shape": list(x.shape), "bf16_ms": cuda_ms(lambda: bf16(xb), args.repeats)}  # noqa: B023
        if args.compile:
            compiled = quant.compile_fresh(bf16)
            row["bf16_compiled_ms"] = cuda_ms(lambda: compiled(xb), args.repeats)  # noqa: B023
        for fmt in ("int8", "fp8"):
            q = _layer(float_layer, x, fmt).to(device)
            for mode in q.supported_modes():
                if mode == "fake":
                    continue
                q.set_mode(mode)
                row[f"{fmt}_{mode}_ms"] = cuda_ms(lambda: q(xb), args.repeats)  # noqa: B023
                if args.compile:
                    cq = quant.compile_fresh(q)
                    row[f"{fmt}_{mode}_compiled_ms"] = cuda_ms(lambda: cq(xb), args.repeats)  # noqa: B023
            if fmt == "int8" and "int8" in q.supported_modes():
                q.set_mode("fake")
                fake = q(x)
                q.set_mode("int8")
                row["int8_vs_fake_max_rel"] = float((q(x) - fake).abs().max() / fake.abs().max())
            if fmt == "fp8" and q.kind == "conv2d" and "fp8" in q.supported_modes() and triton_available(device):
                try:
                    q.set_mode("fp8").set_conv_kernel("triton")  # the implicit-GEMM kernel: no im2col buffer
                    row["fp8_triton_ms"] = cuda_ms(lambda: q(xb), args.repeats)  # noqa: B023
                    q.set_mode("fake")
                    fake = q(x)
                    q.set_mode("fp8")
                    row["fp8_triton_vs_fake_max_rel"] = float((q(x) - fake).abs().max() / fake.abs().max())
                except Exception as exc:  # noqa: BLE001 - keep the other layers' timings
                    row["fp8_triton_error"] = f"{type(exc).__name__}: {exc}"[:2000]
                q.set_conv_kernel("im2col")
        rows.append(row)
        args.checkpoint()
        print(json.dumps(row), flush=True)
    # bare GEMMs (no activation quantization): column-major B for both 8-bit kernels
    for name, (m, k, n) in LINEARS.items():
        a, w = torch.randn(m, k, device=device, dtype=torch.bfloat16), torch.randn(n, k, device=device,
                                                                                    dtype=torch.bfloat16)
        aq = torch.randint(-128, 128, (m, k), device=device, dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
        row = {"gemm": name, "bf16_ms": cuda_ms(lambda: a @ w.t(), args.repeats),  # noqa: B023
               "int8_ms": cuda_ms(lambda: torch._int_mm(aq, wq.t()), args.repeats)}  # noqa: B023
        if quant.fp8_supported(device):
            af, wf = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            one = torch.ones((), device=device)
            row["fp8_ms"] = cuda_ms(lambda: torch._scaled_mm(af, wf.t(), scale_a=one, scale_b=one,  # noqa: B023
                                                             out_dtype=torch.bfloat16), args.repeats)
        rows.append(row)
        args.checkpoint()
        print(json.dumps(row), flush=True)
    return rows


def _random_calibration(unet, rows: int, device) -> quant.CalibrationSet:
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(rows, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    timestep = torch.randint(0, 1000, (rows,), generator=gen)
    text = torch.randn(rows, TEXT_TOKENS, cfg.cross_attention_dim, generator=gen)
    return quant.CalibrationSet(sample, timestep, encoder_hidden_states=text, settings={"method": "random"})


def _unet_inputs(cfg, batch: int, device) -> dict:
    """Random bf16 UNet inputs of one call at ``batch`` (latents, a mid timestep, text embeddings)."""
    return {
        "sample": torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device,
                              dtype=torch.bfloat16),
        "timestep": torch.full((batch,), 500, device=device),
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, cfg.cross_attention_dim, device=device,
                                             dtype=torch.bfloat16),
    }  # fmt: skip


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


class _Call(nn.Module):
    """``unet(sample, t, encoder_hidden_states).sample`` as one module (what gets compiled)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


@torch.no_grad()
def bench_unet(name: str, device, args, done: list) -> dict:
    """Appends this UNet's results to ``done`` at once and fills them in, checkpointing after every cell."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNETS[name]).to(device, torch.bfloat16).eval()
    cal = _random_calibration(unet, 4, device)
    out = {"unet": name, "bf16_weight_bytes": _weight_bytes(unet), "per_call_ms": {}}
    done.append(out)  # partial results are saved beside the finished ones
    variants = {"bf16": unet}
    for fmt in args.formats:
        if fmt == "fp8" and not quant.fp8_supported(device):
            continue
        config = quant.QuantConfig(format=fmt, act_grid=args.grid, weight_grid=args.grid, batch_size=2, mode="dequant",
                                   exclude=[])
        q = quant.quantize(unet, cal, config)
        # the policy is timed at the deployment batch: a layer's fp8 gain grows with its GEMM's rows
        policy_batch = args.policy_batch or max(args.batches)
        inputs = _unet_inputs(unet.config, policy_batch, device)
        usable = fmt == "fp8" and triton_available(device)
        kernels = tuple(k for k in args.policy_conv_kernels if k == "im2col" or usable) or ("im2col",)
        compiled_policy = args.compile and args.policy_timing == "compiled"
        start = time.perf_counter()
        report = quant.choose_modes(q, inputs, candidates=(fmt, "dequant"), fp8_conv_kernels=kernels,
                                    timer=functools.partial(quant.time_layer, repeats=10, compiled=compiled_policy),
                                    budget=args.policy_budget, progress=True)  # fmt: skip
        out[f"{fmt}_policy_timing"] = "compiled" if compiled_policy else "eager"
        out[f"{fmt}_policy_batch"] = policy_batch
        out[f"{fmt}_policy_seconds"] = time.perf_counter() - start
        out[f"{fmt}_policy_untimed_layers"] = sum(not r.seconds for r in report)
        failed = {r.name: r.errors for r in report if r.errors}
        if failed:  # candidates whose kernel did not build or run: never chosen
            out[f"{fmt}_policy_failed_candidates"] = {"layers": len(failed), "first": next(iter(failed.items()))}
        out[f"{fmt}_policy"] = {m: sum(r.chosen == m for r in report) for m in (fmt, f"{fmt}+triton", "dequant")}
        out[f"{fmt}_weight_bytes"] = _weight_bytes(q)
        variants[f"{fmt}"] = q
        all_real = copy.deepcopy(q)  # every layer on the 8-bit kernel where one exists, whatever the timing
        quant.set_mode(all_real, {n: m for n, layer in quant.quant_layers(all_real).items()
                                  for m in [fmt if fmt in layer.supported_modes() else "dequant"]})
        variants[f"{fmt}-all"] = all_real
        if fmt == "fp8" and triton_available(device):  # and every fp8 conv on the Triton kernel
            all_triton = copy.deepcopy(all_real)
            quant.set_conv_kernel(all_triton, "triton")
            variants["fp8-all-triton"] = all_triton
    if args.variants:
        variants = {label: model for label, model in variants.items() if label == "bf16" or label in args.variants}
    for batch in args.batches:
        x, t, text = _unet_inputs(unet.config, batch, device).values()
        row = {}
        for label, model in variants.items():
            call = _Call(model)
            if args.compile:
                call = quant.compile_fresh(call)  # a fresh cache per variant and batch
            try:
                row[label] = cuda_ms(lambda: call(x, t, text), args.unet_repeats)  # noqa: B023
            except Exception as exc:  # noqa: BLE001 - one failing variant must not cost the others' device time
                if label == "bf16":
                    raise
                out.setdefault("errors", {})[f"{label} @ {batch}"] = f"{type(exc).__name__}: {exc}"[:2000]
                print(f"{name} {batch} {label} failed: {type(exc).__name__}: {exc}", flush=True)
                args.checkpoint()
                continue
            if label != "bf16":
                row[f"bf16_over_{label}"] = row["bf16"] / row[label]
            out["per_call_ms"][str(batch)] = row
            args.checkpoint()  # a run cut short by its time limit keeps every cell measured so far
        print(name, batch, json.dumps(row), flush=True)
    for fmt in ("int8", "fp8"):
        if f"{fmt}_weight_bytes" in out:
            out[f"{fmt}_weight_ratio"] = out[f"{fmt}_weight_bytes"] / out["bf16_weight_bytes"]
    return out


@torch.no_grad()
def bench_memory(name: str, args) -> dict:
    """Weight memory of the SD1.5-/SDXL-shaped UNet, bf16 vs int8 vs fp8 storage, for the library default
    (``conv_in`` / ``conv_out`` kept in bf16) and for every layer quantized. Weights do not depend on the latent
    size or on timing, so this part runs on any device: a 16x16 latent and a 2-row random calibration set (the
    scales' values do not change the byte count)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: an fp32 SDXL would need 10 GB
    try:
        unet = UNet2DConditionModel(**{**UNETS[name], "sample_size": 16}).eval()
    finally:
        torch.set_default_dtype(previous)
    cal = _random_calibration(unet, 2, "cpu")
    cal = quant.CalibrationSet(cal.sample.to(torch.bfloat16), cal.timestep,
                               encoder_hidden_states=cal.encoder_hidden_states.to(torch.bfloat16),
                               settings=cal.settings)
    out = {"unet": name, "params": sum(p.numel() for p in unet.parameters()), "bf16_weight_bytes": _weight_bytes(unet)}
    for fmt in ("int8", "fp8"):
        for label, exclude in (("default", list(quant.BOUNDARY_LAYERS)), ("all", [])):
            q = quant.quantize(unet, cal, quant.QuantConfig(format=fmt, act_grid=1, weight_grid=1, batch_size=2,
                                                            exclude=exclude))
            key = f"{fmt}_{label}"
            out[f"{key}_weight_bytes"] = _weight_bytes(q)
            out[f"{key}_weight_ratio"] = out[f"{key}_weight_bytes"] / out["bf16_weight_bytes"]
            del q
    print(json.dumps(out), flush=True)
    return out


def _positive(kind: type) -> Callable[[str], Any]:
    """argparse type: a number of ``kind`` greater than 0."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a {kind.__name__} > 0, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be a {kind.__name__} > 0, got {text!r}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["layers", "unet"], choices=["layers", "unet", "memory"],
                        help="parts to run (default layers unet; memory: weight bytes only, runs without a GPU)")
    parser.add_argument("--unets", nargs="+", default=list(UNETS), choices=list(UNETS),
                        help="UNet shapes of the unet and memory parts (default sd15 sdxl)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8, 16],
                        help="part unet: batch sizes of the timed UNet calls (default 1 2 8 16)")
    parser.add_argument("--formats", nargs="+", default=["int8", "fp8"], choices=["int8", "fp8"],
                        help="8-bit formats of part unet (bf16 is always the baseline)")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(UNET_VARIANTS),
                        help="part unet: time only these (default all; bf16 always)")
    parser.add_argument("--grid", type=int, default=10,
                        help="range-search grid of the calibration (speed does not depend on it; 1 = absmax)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="time eager modules only, no torch.compile (default: compiled as well)")
    parser.add_argument("--policy-conv-kernels", nargs="+", choices=list(quant.CONV_KERNELS),
                        default=list(quant.CONV_KERNELS),
                        help="fp8 conv kernels the policy times (triton only where it can run; default both)")
    parser.add_argument("--policy-batch", type=_positive(int), default=None,
                        help="batch at which the per-layer policy times each layer (default: the largest of --batches)")
    parser.add_argument("--policy-budget", type=_positive(float), default=None, metavar="SECONDS",
                        help="stop timing layer signatures after this many seconds (largest signatures first; the "
                             "rest run dequant)")
    parser.add_argument("--policy-timing", choices=["compiled", "eager"], default="compiled",
                        help="how the per-layer policy times each layer signature (compiled: as the UNet will run; "
                             "eager only without --no-compile makes a difference)")
    parser.add_argument("--repeats", type=int, default=50,
                        help="part layers: timed runs per layer and GEMM, median reported (default 50)")
    parser.add_argument("--unet-repeats", type=int, default=10,
                        help="part unet: timed calls per variant and batch, median reported (default 10)")
    parser.add_argument("--out", default="scripts/results_quant_cuda.json",
                        help="results JSON, rewritten after every cell (default scripts/results_quant_cuda.json)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.parts == ["memory"]:
        results = {"memory": [bench_memory(name, args) for name in args.unets], "torch": torch.__version__}
        results["seconds"] = time.perf_counter() - start
        return _write(args.out, results)
    device = require_cuda()
    torch.backends.cudnn.allow_tf32 = False  # the float32 fake-quant reference of the parity check, not TF32
    from fewstep.quant.kernels import scaled_mm_fuses_bias

    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
               "fp8": quant.fp8_supported(device), "compile": args.compile,
               "fp8_bias_in_gemm_epilogue": quant.fp8_supported(device) and scaled_mm_fuses_bias(device)}
    args.checkpoint = lambda: _write(args.out, {**results, "seconds": time.perf_counter() - start}, quiet=True)
    if "memory" in args.parts:
        results["memory"] = [bench_memory(name, args) for name in args.unets]
    if "layers" in args.parts:
        results["layers"] = []
        bench_layers(device, args, results["layers"])
    if "unet" in args.parts:
        results["unets"] = []
        for name in args.unets:
            bench_unet(name, device, args, results["unets"])
    results["seconds"] = time.perf_counter() - start
    return _write(args.out, results)


def _write(path: str, results: dict, quiet: bool = False) -> int:
    from fewstep._io import atomic_write

    atomic_write(path, lambda p: p.write_text(json.dumps(results, indent=1) + "\n"))
    if not quiet:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
