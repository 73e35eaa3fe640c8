"""Per-layer execution policy: run a layer with a real 8-bit kernel only where that is measured faster.

On an H100, int8 GEMMs via ``torch._int_mm`` run at about bf16 speed, fp8 (``torch._scaled_mm``) is
1.8-2.2x faster only for wide layers, and 8-bit convs have no fast PyTorch path (research notes,
sec. 4). So the choice is made per layer, by timing each candidate mode on the layer's real input
(captured from one forward pass); layers where no 8-bit kernel wins run in ``dequant`` mode (8-bit
storage, float/bf16 compute). The timing function is injectable, which is how tests check the
mechanics without depending on the machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_int
from .modules import MODES, QuantLayer, quant_layers

__all__ = ["LayerTiming", "time_layer", "capture_layer_inputs", "choose_modes"]


@dataclass
class LayerTiming:
    """Measured seconds per call of one layer in each candidate mode, and the chosen mode."""

    name: str
    seconds: dict[str, float]
    chosen: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_layer(layer: QuantLayer, x: torch.Tensor, mode: str, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock seconds of ``layer(x)`` in ``mode`` (device-synchronised); the layer's mode is restored."""
    check_int("repeats", repeats, 1, numpy_ok=False)
    previous = layer.mode
    layer.set_mode(mode)
    try:
        for _ in range(warmup):
            layer(x)
        _sync(x.device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            layer(x)
            _sync(x.device)
            times.append(time.perf_counter() - start)
    finally:
        layer.set_mode(previous)
    return statistics.median(times)


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


def choose_modes(
    model: nn.Module,
    inputs: dict,
    candidates: tuple[str, ...] = ("int8", "fp8", "dequant"),
    timer: Callable[[QuantLayer, torch.Tensor, str], float] | None = None,
    margin: float = 1.0,
    apply: bool = True,
) -> list[LayerTiming]:
    """Time each quantized layer in every candidate mode it supports and pick the fastest.

    A real 8-bit mode must beat ``dequant`` by the factor ``margin`` (>= 1) to be chosen -- ties keep
    float compute, which has no quantize/dequantize overhead to hide. ``inputs``: keyword inputs of one
    representative forward (e.g. a calibration batch at the deployment batch size). ``apply`` sets the
    chosen modes on the model.
    """
    unknown = [c for c in candidates if c not in MODES]
    if not candidates or unknown:
        raise ValueError(f"`candidates` must be a non-empty subset of {list(MODES)}, got {list(candidates)!r}")
    if not (isinstance(margin, (int, float)) and margin >= 1):
        raise ValueError(f"`margin` must be a number >= 1, got {margin!r}")
    layers = quant_layers(model)
    if not layers:
        raise ValueError("`model` holds no quantized layers (run fewstep.quant.quantize first)")
    timer = timer or time_layer
    xs = capture_layer_inputs(model, inputs)
    report = []
    for name, layer in layers.items():
        if name not in xs:
            continue
        modes = [m for m in candidates if m in layer.supported_modes()]
        if not modes:
            continue
        seconds = {m: float(timer(layer, xs[name], m)) for m in modes}
        fallback = "dequant" if "dequant" in seconds else min(seconds, key=seconds.get)
        best = min(seconds, key=seconds.get)
        chosen = best if best == fallback or seconds[best] * margin < seconds[fallback] else fallback
        if apply:
            layer.set_mode(chosen)
        report.append(LayerTiming(name, seconds, chosen))
    return report
