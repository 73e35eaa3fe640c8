"""Per-layer execution policy: run a layer with a real 8-bit kernel only where that is measured faster.

On an H100, int8 GEMMs via ``torch._int_mm`` run at about bf16 speed, fp8 (``torch._scaled_mm``) is
1.8-2.2x faster only for wide layers, and 8-bit convs have no fast PyTorch path (research notes,
sec. 4). So the choice is made per layer, by timing each candidate mode on the layer's real input
(captured from one forward pass); layers where no 8-bit kernel wins run in ``dequant`` mode (8-bit
storage, float/bf16 compute). The timing function is injectable, which is how tests check the
mechanics without depending on the machine.

Layers with the same structure and input shape (``layer_signature``) run the same kernels, so each distinct
signature is timed once and its choice applies to all of them (an SDXL-shaped UNet has ~800 quantized layers
but a few dozen signatures). ``compiled=True`` times each candidate under ``torch.compile``: there the
activation quantization fuses into neighbouring kernels, which the eager timing charges as separate launches
(on an H200 an fp8 ``Linear`` is 9x slower than bf16 eager although its GEMM alone is 1.3-1.7x faster), so a
policy meant for a compiled model should be chosen compiled.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._checks import check_int
from .kernels import conv_output_size
from .modules import CONV_KERNELS, MODES, QuantLayer, quant_layers

__all__ = ["LayerTiming", "time_layer", "capture_layer_inputs", "choose_modes", "layer_signature", "layer_macs",
           "compile_fresh"]


@dataclass
class LayerTiming:
    """Measured seconds per call of one layer in each candidate mode, and the chosen mode; ``errors``: the
    candidates whose timing raised (their ``seconds`` are ``inf``, so they are never chosen), with the message."""

    name: str
    seconds: dict[str, float]
    chosen: str
    errors: dict[str, str] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module(*args, **kwargs)


def compile_fresh(module: nn.Module, **options: Any) -> Callable:
    """``torch.compile`` of ``module``'s call, compiled into a code object of its own. Dynamo caches compiled code
    per code object and holds only ``torch._dynamo.config.cache_size_limit`` entries there: past them it silently
    runs eagerly. Instances of one class (and every mode of a ``QuantLayer``) share their ``forward`` code, so a
    benchmark that compiles many layers or variants one after another would time eager code under a compiled
    label; each call of this function starts an empty cache instead."""
    fresh = types.FunctionType(_call_module.__code__.replace(), _call_module.__globals__, "compiled_call")
    compiled = torch.compile(fresh, **options)
    return functools.partial(compiled, module)


def _compile_options(compiled: bool | Mapping[str, Any]) -> dict | None:
    """``compiled`` as ``torch.compile`` keyword arguments (``None``: eager)."""
    if compiled is False:
        return None
    if compiled is True:
        return {"dynamic": False}
    if isinstance(compiled, Mapping):
        return dict(compiled)
    raise ValueError(f"`compiled` must be a bool or a dict of torch.compile arguments, got {compiled!r}")


@torch.no_grad()
def time_layer(
    layer: QuantLayer, x: torch.Tensor, mode: str, repeats: int = 20, warmup: int = 3,
    compiled: bool | Mapping[str, Any] = False,
) -> float:
    """Median wall-clock seconds of ``layer(x)`` in ``mode`` (device-synchronised); the layer's mode is restored.
    ``compiled``: time ``torch.compile(layer)`` instead (``True``, or a dict of ``torch.compile`` arguments),
    compiled in this mode on the first warm-up call, into a dynamo cache of its own (``compile_fresh``)."""
    check_int("repeats", repeats, 1, numpy_ok=False)
    options = _compile_options(compiled)
    check_int("warmup", warmup, 1 if options is not None else 0, numpy_ok=False)
    previous = layer.mode
    layer.set_mode(mode)
    try:
        call = compile_fresh(layer, **options) if options is not None else layer
        for _ in range(warmup):
            call(x)
        _sync(x.device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call(x)
            _sync(x.device)
            times.append(time.perf_counter() - start)
    finally:
        layer.set_mode(previous)
    return statistics.median(times)


def layer_signature(layer: QuantLayer, x: torch.Tensor) -> tuple:
    """What decides a layer's kernel timings: kind, format, shortcut split, weight shape, conv geometry and the
    input's shape, dtype and device. Layers with equal signatures are timed once by ``choose_modes``."""
    geometry = tuple(sorted((k, str(v)) for k, v in layer.conv.items())) if layer.kind == "conv2d" else ()
    weights = tuple(tuple(getattr(layer, f"weight_q{g}").shape) for g in range(layer.groups))
    return (layer.kind, layer.fmt, layer.split, weights, geometry, layer.bias is not None, tuple(x.shape),
            x.dtype, str(x.device))


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    """One forward of ``model(**inputs)``; returns each quantized layer's input tensor."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in quant_layers(model).items():
        def hook(module, args, name=name):
            captured.setdefault(name, args[0].detach())
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


def _conv_kernels(layer: QuantLayer, mode: str, wanted: tuple[str, ...]) -> list[str]:
    """The conv kernels to time for ``layer`` in ``mode``: only fp8 convs have a choice, and only where the
    kernel can run (``QuantLayer.set_conv_kernel`` accepts it)."""
    if layer.kind != "conv2d":
        return ["im2col"]
    if mode != "fp8":
        return ["im2col"]
    usable = []
    for kernel in wanted:
        try:
            layer.set_conv_kernel(kernel)
        except (ValueError, RuntimeError):
            continue
        usable.append(kernel)
    layer.set_conv_kernel("im2col")
    return usable or ["im2col"]


def layer_macs(layer: QuantLayer, x: torch.Tensor) -> int:
    """Multiply-adds of one call of ``layer`` on ``x``: ``M * K * N`` of its GEMM (a conv's ``M`` is the number of
    output positions, ``K`` the patch size per group)."""
    n = layer.out_channels
    if layer.kind == "linear":
        k = layer.in_channels
        return (x.numel() // max(k, 1)) * k * n
    c = layer.conv
    kh, kw = c["kernel_size"]
    b, _, h, w = x.shape
    if c["padding"] == "same":  # keeps the size (stride 1)
        ho, wo = h, w
    else:
        padding = (0, 0) if c["padding"] == "valid" else c["padding"]
        ho, wo = conv_output_size(h, w, (kh, kw), c["stride"], padding, c["dilation"])
    return b * ho * wo * (layer.in_channels // c["groups"]) * kh * kw * n


def choose_modes(
    model: nn.Module,
    inputs: dict,
    candidates: tuple[str, ...] = ("int8", "fp8", "dequant"),
    timer: Callable[[QuantLayer, torch.Tensor, str], float] | None = None,
    margin: float = 1.0,
    apply: bool = True,
    fp8_conv_kernels: tuple[str, ...] = ("im2col",),
    compiled: bool | Mapping[str, Any] = False,
    budget: float | None = None,
    progress: bool = False,
) -> list[LayerTiming]:
    """Time each quantized layer in every candidate mode it supports and pick the fastest.

    A real 8-bit mode must beat ``dequant`` by the factor ``margin`` (>= 1) to be chosen -- ties keep
    float compute, which has no quantize/dequantize overhead to hide. ``inputs``: keyword inputs of one
    representative forward (e.g. a calibration batch at the deployment batch size). ``apply`` sets the
    chosen modes on the model. ``fp8_conv_kernels``: the conv kernels (``CONV_KERNELS``) to time for fp8
    convs; with ``"triton"`` an fp8 conv that can run the Triton kernel is also timed as ``"fp8+triton"``.
    ``compiled``: time under ``torch.compile`` (the default timer's ``compiled``; ignored with a custom
    ``timer``). Each ``layer_signature`` is timed once; layers sharing it share the timings and the choice.

    Signatures are timed in order of their share of the model's multiply-adds (``layer_macs`` times the number
    of layers sharing it), largest first. ``budget``: seconds of timing after which the remaining signatures are
    not timed; their layers run ``dequant`` (8-bit storage, float compute: the policy's fallback) and are
    reported with empty ``seconds`` -- for large compiled models, where each timing compiles. ``progress``: a
    tqdm bar over the signatures.
    """
    unknown = [c for c in candidates if c not in MODES]
    if not candidates or unknown:
        raise ValueError(f"`candidates` must be a non-empty subset of {list(MODES)}, got {list(candidates)!r}")
    bad = [k for k in fp8_conv_kernels if k not in CONV_KERNELS]
    if not fp8_conv_kernels or bad:
        raise ValueError(f"`fp8_conv_kernels` must be a non-empty subset of {list(CONV_KERNELS)}, "
                         f"got {list(fp8_conv_kernels)!r}")
    if not (isinstance(margin, (int, float)) and margin >= 1):
        raise ValueError(f"`margin` must be a number >= 1, got {margin!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
        raise ValueError(f"`budget` must be None or a number of seconds > 0, got {budget!r}")
    layers = quant_layers(model)
    if not layers:
        raise ValueError("`model` holds no quantized layers (run fewstep.quant.quantize first)")
    _compile_options(compiled)  # validated here, before any timing
    if timer is None:
        def timer(layer, x, mode):
            return time_layer(layer, x, mode, compiled=compiled)
    xs = capture_layer_inputs(model, inputs)
    # one entry per signature (and candidate set): its first layer, and the multiply-adds of all its layers
    keyed: dict[str, tuple] = {}
    groups: dict[tuple, list] = {}
    for name, layer in layers.items():
        if name not in xs:
            continue
        modes = [m for m in candidates if m in layer.supported_modes()]
        if not modes:
            continue
        key = (layer_signature(layer, xs[name]), tuple(modes))
        keyed[name] = key
        group = groups.setdefault(key, [name, 0])
        group[1] += layer_macs(layer, xs[name])
    timed: dict[tuple, tuple[dict[str, float], dict[str, str]]] = {}  # signature -> (seconds, errors)
    start = time.perf_counter()
    order = sorted(groups, key=lambda k: -groups[k][1])
    for key in tqdm(order, desc="timing layer signatures", disable=not progress):
        if budget is not None and time.perf_counter() - start > budget:
            break
        name = groups[key][0]
        layer = layers[name]
        previous_kernel = layer.conv_kernel
        seconds, errors = {}, {}
        for m in key[1]:
            for kernel in _conv_kernels(layer, m, fp8_conv_kernels):
                label = m if kernel == "im2col" else f"{m}+{kernel}"
                layer.set_conv_kernel(kernel)
                try:
                    seconds[label] = float(timer(layer, xs[name], m))
                except Exception as exc:  # a kernel that does not build or run here is not a candidate
                    if m == "dequant":
                        raise  # the fallback itself: nothing to fall back to
                    seconds[label], errors[label] = math.inf, f"{type(exc).__name__}: {exc}"
        layer.set_conv_kernel(previous_kernel)
        timed[key] = (seconds, errors)
    report = []
    for name, key in keyed.items():
        layer = layers[name]
        seconds, errors = (dict(d) for d in timed.get(key, ({}, {})))
        if seconds and min(seconds.values()) < math.inf:
            fallback = "dequant" if "dequant" in seconds else min(seconds, key=seconds.get)
            best = min(seconds, key=seconds.get)
            chosen = best if best == fallback or seconds[best] * margin < seconds[fallback] else fallback
        else:  # not timed within the budget, or no candidate ran
            chosen = "dequant"
        if apply:
            mode, _, kernel = chosen.partition("+")
            layer.set_conv_kernel(kernel or "im2col")
            layer.set_mode(mode)
        report.append(LayerTiming(name, seconds, chosen, errors))
    return report
