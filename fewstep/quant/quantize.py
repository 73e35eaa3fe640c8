"""``quantize(unet, calibration, config)``: PTQ4DM-style W8A8 post-training quantization.

1. every ``nn.Linear`` / ``nn.Conv2d`` (minus ``exclude``; by default ``conv_in`` and ``conv_out`` stay in
   float, see ``BOUNDARY_LAYERS``) gets per-output-channel weight scales from a
   range search on the weight itself;
2. the calibration set is run through the *full-precision* network twice -- once for each layer input's
   min/max, once for its histogram over that range -- and a per-tensor static clip range is searched on
   the histogram (PTQ4DM sec. 3.4: L_p, p = 2.4 by default; what is minimised is a histogram model of that
   distance, see ``quantizers.range_error``);
3. the layers are swapped for ``QuantLayer`` modules (fake-quant reference mode unless ``config.mode``
   says otherwise).

With ``split_skip`` the up-block resnets' ``conv_shortcut`` (whose input is ``cat([h, skip])``) get one
activation quantizer per part (Q-Diffusion's shortcut splitting); the split point is read from the
skip tensors the up block receives.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._checks import check_bool, check_int
from .calibration import CalibrationSet, progress_bar
from .modules import MODES, QuantLayer
from .quantizers import FORMATS, METRICS, Histogram, act_qparams_from_range, search_act_range, weight_qparams

__all__ = ["BOUNDARY_LAYERS", "QuantConfig", "quantize", "quantizable_layers", "find_skip_splits"]

#: Layers kept in float by default (``QuantConfig.exclude``): the model's input and output boundary.
#: fewstep's activation quantizer sits on each layer's *input*, so quantizing ``conv_in`` would quantize the
#: network input x_t itself with one static range for every noise level. PTQ4DM's released code puts
#: activation quantizers on layer *outputs* (QDrop convention) and leaves the last layer's output in float,
#: so x_t and the model output are never quantized there; keeping ``conv_in`` (the layer that consumes x_t
#: in diffusers UNets) and ``conv_out`` (the output layer) in float is the closest input-side equivalent
#: (it also keeps their weights in float; 0.2% of the digits-eps MACs). Patterns that match nothing (e.g.
#: SD3/Flux transformers) are ignored. ``QuantConfig(exclude=[])`` quantizes every layer.
BOUNDARY_LAYERS: tuple[str, ...] = ("conv_in", "conv_out")


@dataclass
class QuantConfig:
    """Settings of ``quantize``.

    ``format``: ``int8`` (PTQ4DM's grid) or ``fp8`` (e4m3); ``metric``: range-search criterion for
    activations (``lp``, ``mse``, ``cosine``, ``kl``) with ``p`` for ``lp``; weights use the same
    criterion except ``kl`` (then L_p); ``act_grid`` / ``weight_grid`` candidates per search axis;
    ``symmetric_act`` restricts activation ranges to ``[-c, c]``; ``split_skip`` enables shortcut
    splitting; ``exclude``: ``fnmatch`` patterns of layer names kept in float (default ``BOUNDARY_LAYERS``:
    ``conv_in`` and ``conv_out``, as PTQ4DM never quantizes x_t or the output; ``[]`` quantizes every
    layer; patterns matching no layer are ignored); ``mode``: execution mode
    the returned layers start in; ``batch_size`` rows per calibration forward.
    """

    format: str = "int8"
    metric: str = "lp"
    p: float = 2.4
    act_grid: int = 100
    weight_grid: int = 80
    bins: int = 2048
    symmetric_act: bool = False
    split_skip: bool = False
    exclude: list[str] = field(default_factory=lambda: list(BOUNDARY_LAYERS))
    mode: str = "fake"
    batch_size: int = 256

    def validate(self) -> QuantConfig:
        if self.format not in FORMATS:
            raise ValueError(f"`format` must be one of {list(FORMATS)}, got {self.format!r}")
        if self.metric not in METRICS:
            raise ValueError(f"`metric` must be one of {list(METRICS)}, got {self.metric!r}")
        if self.mode not in MODES:
            raise ValueError(f"`mode` must be one of {list(MODES)}, got {self.mode!r}")
        if self.mode in ("int8", "fp8") and self.mode != self.format:
            raise ValueError(f"`mode` {self.mode!r} runs {self.mode} parameters; `format` is {self.format!r} (use "
                             f"mode={self.format!r}, 'fake' or 'dequant')")  # fmt: skip
        for name in ("act_grid", "weight_grid", "batch_size"):
            v = getattr(self, name)
            check_int(name, v, 1, numpy_ok=False)
        check_int("bins", self.bins, 16, numpy_ok=False)
        for name in ("symmetric_act", "split_skip"):
            check_bool(name, getattr(self, name))
        self.exclude = _check_exclude(self.exclude)
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not (math.isfinite(self.p)
                                                                                    and self.p > 0):
            raise ValueError(f"`p` must be a finite number > 0, got {self.p!r}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def _check_exclude(exclude: Iterable[str]) -> list[str]:
    """``exclude`` as a list, if it is a collection (list, tuple, set, generator) of ``fnmatch`` patterns; a bare string
    is refused (it would be read letter by letter)."""
    patterns = None if isinstance(exclude, (str, bytes)) or not isinstance(exclude, Iterable) else list(exclude)
    if patterns is None or not all(isinstance(pat, str) for pat in patterns):
        raise ValueError(f"`exclude` must be a list of fnmatch patterns (strings; [] quantizes every layer), got "
                         f"{exclude!r}")  # fmt: skip
    return patterns


def _is_peft_tuner_layer(m: nn.Module) -> bool:
    """Whether ``m`` is a peft adapter wrapper (``BaseTunerLayer``: ``lora.Linear``, ``lora.Conv2d``, ... around a
    ``base_layer``, with ``lora_A``/``lora_B``-style adapter dicts), recognised by its attributes without importing
    peft (not a dependency of fewstep)."""
    return isinstance(getattr(m, "base_layer", None), nn.Module) and (
        isinstance(getattr(type(m), "adapter_layer_names", None), tuple)
        or isinstance(getattr(m, "merged_adapters", None), list)
    )


def refuse_peft_adapters(model: nn.Module, what: str) -> None:
    """Refuse to put ``what`` (a saved or in-memory quantization) on a ``model`` that carries peft adapter layers
    (a LoRA from ``load_lora_weights`` / ``add_adapter``): the quantization was made from weights without them, and
    its 8-bit layers cannot sit inside peft's wrappers."""
    for name, m in model.named_modules():
        if _is_peft_tuner_layer(m):
            raise ValueError(
                f"{what} cannot be put on this model: layer {name!r} is a peft {type(m).__name__} adapter layer (a "
                "LoRA). A quantization fits the weights it was made from: merge and remove the LoRA "
                "(pipe.fuse_lora(); pipe.unload_lora_weights()) and quantize that model again"
            )


def _adapter_exclude(model: nn.Module, adapters: list[str], exclude: list[str]) -> list[str]:
    """A ready-to-paste ``exclude`` that keeps the peft wrappers ``adapters`` (names), their base layers and factors
    in float on top of ``exclude``: the user's patterns that still match a layer outside those wrappers, then one
    ``'<wrapper>.*'`` per wrapper, or, beyond 8 wrappers, shorter ``'*.<suffix>.*'`` patterns, each kept only if
    the ``nn.Linear`` / ``nn.Conv2d`` layers it matches are all inside the wrappers (so the list matches exactly
    what the per-wrapper patterns match)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    inside = {n for n in layers if any(n.startswith(a + ".") for a in adapters)}
    kept = [pat for pat in exclude if any(fnmatch.fnmatch(n, pat) for n in layers if n not in inside)]
    if len(adapters) <= 8:
        return kept + [a + ".*" for a in adapters]
    patterns: list[str] = []
    for a in adapters:
        if all(any(fnmatch.fnmatch(n, pat) for pat in patterns) for n in inside if n.startswith(a + ".")):
            continue  # already covered by an earlier pattern
        parts = a.split(".")
        for k in range(1, len(parts) + 1):
            pat = ("*." if k < len(parts) else "") + ".".join(parts[-k:]) + ".*"
            if all(n in inside for n in layers if fnmatch.fnmatch(n, pat)):
                patterns.append(pat)
                break
    return kept + list(dict.fromkeys(patterns))


def quantizable_layers(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Name -> ``nn.Linear`` / ``nn.Conv2d`` of ``model`` not matched by an ``exclude`` pattern (a list, tuple or set of
    ``fnmatch`` patterns). A subclass with submodules or its own ``forward`` (an unfused LoRA layer, an
    already-wrapped layer) is an error: replacing it by a plain 8-bit layer would drop what it adds. So is a peft
    adapter wrapper (diffusers' ``load_lora_weights`` / ``add_adapter``; fused or not) with a layer not excluded:
    quantizing its base layer and adapter factors would break peft's forward; that error gives an ``exclude`` that
    keeps every adapter layer in float at once."""
    exclude = _check_exclude(exclude)

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pat) for pat in exclude)

    adapters = [(name, m) for name, m in model.named_modules()
                if _is_peft_tuner_layer(m) and any(isinstance(sub, (nn.Linear, nn.Conv2d)) and not excluded(sub_name)
                                                   for sub_name, sub in m.named_modules(prefix=name))]
    if adapters:
        name, m = adapters[0]
        state = "fused but still wrapped" if getattr(m, "merged_adapters", None) else "unfused"
        patterns = _adapter_exclude(model, [a for a, _ in adapters], exclude)
        raise ValueError(
            f"layer {name!r} is a peft {type(m).__name__} adapter layer ({state} LoRA, from load_lora_weights / "
            "add_adapter): quantizing it would quantize the adapter factors and break peft's forward. Merge the "
            "LoRA and remove the adapter layers first: pipe.fuse_lora(); pipe.unload_lora_weights() (on a model "
            "alone: unet.fuse_lora(); unet.unload_lora(); fuse_lora alone keeps the adapter layers), then "
            f"quantize; or leave all {len(adapters)} adapter layer(s) and their factors in float with "
            f"exclude={patterns!r} (your exclude plus the adapter layers; such a quantization runs in memory only: "
            "load_quantized and FewstepPipeline(quantized=...) refuse a model carrying peft adapters, so a "
            "quantization to save and load must be made from the fused-and-unloaded model)"
        )
    found = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or excluded(name):
            continue
        base = nn.Linear if isinstance(m, nn.Linear) else nn.Conv2d
        if type(m) is not base and (next(m.children(), None) is not None or type(m).forward is not base.forward):
            raise ValueError(
                f"layer {name!r} is a {type(m).__name__} (a {base.__name__} with its own forward or submodules, e.g. "
                "an unfused LoRA): fuse it first (pipe.fuse_lora()) or leave it in float with exclude=[...]"
            )
        found[name] = m
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def find_skip_splits(model: nn.Module, calibration: CalibrationSet) -> dict[str, int]:
    """``conv_shortcut`` name -> number of leading (non-skip) input channels, for diffusers up blocks.

    An up block's ``i``-th resnet sees ``cat([h, res_hidden_states_tuple[-1 - i]])``; the split point is
    its input channels minus that skip tensor's channels. Found with one forward of a calibration batch.
    """
    splits: dict[str, int] = {}
    handles = []
    for block_name, block in model.named_modules():
        resnets = getattr(block, "resnets", None)
        if not block_name.split(".")[-2:-1] == ["up_blocks"] or resnets is None:
            continue

        def hook(module, args, kwargs, block_name=block_name):
            skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if skips is None:
                return None
            for i, resnet in enumerate(module.resnets):
                shortcut = getattr(resnet, "conv_shortcut", None)
                if not isinstance(shortcut, nn.Conv2d) or i >= len(skips):
                    continue
                first = shortcut.in_channels - skips[-1 - i].shape[1]
                if 0 < first < shortcut.in_channels:
                    splits[f"{block_name}.resnets.{i}.conv_shortcut"] = first
            return None

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        batch = next(calibration.batches(2))
        with torch.no_grad():
            model(**_to(batch, model))
    finally:
        for h in handles:
            h.remove()
    return splits


def _to(batch: dict, model: nn.Module) -> dict:
    p = next(model.parameters())
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):  # SDXL's added_cond_kwargs
            out[k] = _to(v, model)
        else:
            out[k] = v.to(p.device, dtype=p.dtype) if v.is_floating_point() and k != "timestep" else v.to(p.device)
    return out


def _run_with_input_hooks(model, calibration, layers, splits, batch_size, observe, desc, progress):
    def make_hook(name):
        split = splits.get(name, 0)
        dim = -1 if isinstance(layers[name], nn.Linear) else 1

        def hook(module, args):
            x = args[0].detach()
            if split:
                parts = [x.narrow(dim, 0, split), x.narrow(dim, split, x.shape[dim] - split)]
            else:
                parts = [x]
            for g, part in enumerate(parts):
                observe(name, g, part)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for batch in progress_bar(list(calibration.batches(batch_size)), desc=desc, disable=not progress):
                model(**_to(batch, model))
    finally:
        for h in handles:
            h.remove()


def quantize(
    unet: nn.Module,
    calibration: CalibrationSet,
    config: QuantConfig | None = None,
    inplace: bool = False,
    progress: bool = False,
) -> nn.Module:
    """W8A8-quantize ``unet`` (any module taking ``sample, timestep, ...`` keywords) on ``calibration``.

    Returns the model with its ``Linear``/``Conv2d`` layers replaced by ``QuantLayer`` (a deep copy unless
    ``inplace``); ``model.fewstep_quant`` holds the settings (saved by ``save_quantized``).
    """
    config = (config or QuantConfig()).validate()
    check_bool("inplace", inplace)
    check_bool("progress", progress)
    if not isinstance(calibration, CalibrationSet):
        raise TypeError(f"`calibration` must be a fewstep.quant.CalibrationSet, got {type(calibration).__name__}")
    if len(calibration) == 0:
        raise ValueError("`calibration` is empty (0 rows): build it with build_calibration_set(num_samples >= 1)")
    if getattr(unet, "fewstep_quant", None) is not None or any(isinstance(m, QuantLayer) for m in unet.modules()):
        raise ValueError(
            f"`unet` ({type(unet).__name__}) is already quantized (it holds QuantLayers): quantize the full-precision "
            "model (a second pass would calibrate the 8-bit layers' leftovers and save an artifact no model loads)"
        )
    layers = quantizable_layers(unet, config.exclude)
    if not layers:
        raise ValueError(
            f"`unet` ({type(unet).__name__}) has no quantizable layers (nn.Linear / nn.Conv2d)"
            + (f" outside exclude={config.exclude}" if config.exclude else "")
        )
    # a NaN/Inf weight would surface only as non-finite calibration activations further down: name it first
    for pname, param in unet.named_parameters():
        if not bool(torch.isfinite(param.detach()).all()):
            layer = pname.rpartition(".")[0]
            raise ValueError(f"`unet` has non-finite values (NaN/Inf) in parameter {pname!r} (layer {layer!r}) of the "
                             "full-precision model: fix the checkpoint before quantizing")
    if "sample" not in inspect.signature(unet.forward).parameters:
        raise ValueError(
            f"`unet` is a {type(unet).__name__}: fewstep.quant calibrates UNets (forward(sample, timestep, ...): "
            "UNet2DModel, UNet2DConditionModel); transformers such as SD3's and Flux's are not supported yet"
        )
    from .artifacts import model_fingerprint

    fingerprint = model_fingerprint(unet)
    model = unet if inplace else copy.deepcopy(unet)
    model.eval()
    layers = quantizable_layers(model, config.exclude)
    splits = find_skip_splits(model, calibration) if config.split_skip else {}
    splits = {k: v for k, v in splits.items() if k in layers}

    ranges: dict[tuple[str, int], list[float]] = {}

    def observe_range(name, g, x):
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"the calibration set drives layer {name!r} to non-finite inputs (min {lo}, max {hi}): "
                             "check the calibration samples for NaN/Inf (CalibrationSet tensors)")
        r = ranges.setdefault((name, g), [lo, hi])
        r[0], r[1] = min(r[0], lo), max(r[1], hi)

    _run_with_input_hooks(model, calibration, layers, splits, config.batch_size, observe_range,
                          "calibration ranges", progress)
    hists = {key: Histogram(lo, hi, config.bins) for key, (lo, hi) in ranges.items()}

    def observe_hist(name, g, x):
        hists[(name, g)].add(x)

    _run_with_input_hooks(model, calibration, layers, splits, config.batch_size, observe_hist,
                          "calibration histograms", progress)
    missing = sorted({name for name in layers if (name, 0) not in hists})
    if missing:
        raise ValueError(f"the calibration forward never reached layers {missing[:5]}: exclude them")
    weight_metric = "lp" if config.metric == "kl" else config.metric
    summary, built = {}, {}
    for name, layer in progress_bar(list(layers.items()), desc="range search", disable=not progress):
        split = splits.get(name, 0)
        w = layer.weight.detach()
        w_parts = [w] if not split else [w[:, :split], w[:, split:]]
        w_scales = [weight_qparams(part, weight_metric, config.p, config.weight_grid, config.format)
                    for part in w_parts]
        acts = []
        for g in range(len(w_parts)):
            lo, hi = search_act_range(hists[(name, g)], config.metric, config.p, config.act_grid, config.format,
                                      config.symmetric_act)
            acts.append(act_qparams_from_range(lo, hi, config.format))
        q = QuantLayer(layer, w_scales, acts, config.format, split, mode="fake", name=name)
        try:
            q.set_mode(config.mode)
        except (ValueError, RuntimeError) as exc:
            raise type(exc)(f"layer {name!r}: {exc} (or leave it in float with exclude=[{name!r}])") from exc
        built[name] = q
        summary[name] = {"split": split, "observed": [list(ranges[(name, g)]) for g in range(len(w_parts))]}
    for name, q in built.items():  # swapped only once every layer is built: a failure leaves `unet` as it was
        _set_submodule(model, name, q)
    model.fewstep_quant = {
        "config": config.as_dict(),
        "calibration": dict(calibration.settings, rows=len(calibration)),
        "fingerprint": fingerprint,
        "layers": summary,
    }
    return model
