"""Quantized parameters as artifacts: ``quant.safetensors`` (8-bit weights, scales, biases) + ``quant.json``
(settings, per-layer activation quantizers, the model they belong to). No pickle.

Loading applies them to a full-precision model of the same architecture and weights; the metadata is
checked first and any mismatch (other layers or shapes, other weights, other format version) is a
``ValueError`` naming what differs -- never a silent fallback.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._checks import check_bool
from .._io import atomic_write, first_missing_dir
from .modules import MODES, SETTABLE_MODES, QuantLayer, quant_layers
from .quantize import _set_submodule, refuse_peft_adapters
from .quantizers import FORMATS, ActQParams, act_qparams_problem, weight_scale_problem

#: the dtype each format stores its 8-bit weights in
STORAGE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}

__all__ = ["save_quantized", "load_quantized", "model_fingerprint", "ARTIFACT_VERSION", "TENSORS_FILE", "META_FILE"]

ARTIFACT_VERSION = 1
TENSORS_FILE = "quant.safetensors"
META_FILE = "quant.json"
_NORM_RTOL = 2e-3  # weights loaded in float16/bfloat16 still match their float32 originals


_PROJ_ATOL = 2e-2  # |projection change| / weight norm: bf16/fp16 rounding moves it ~2e-3, other weights by O(1)
_PROJECTIONS = 4
# The stored 8-bit weights times their scales against the float weights' recorded norm and projections. Quantization
# moves every element by at most half a grid step (e4m3: at most 2^-4 of the element; int8: s/2), and the clipping
# search keeps a clip only where it lowers the error below the unclipped rounding one, so ||W_hat - W|| stays a few
# percent of ||W|| and the norm moves by less (measured on digits-eps: norm 0.19% fp8 / 0.02% int8, projections 0.064
# fp8 / 0.021 int8). The tolerances: twice e4m3's per-element bound for the norm; four times it for each projection,
# whose change is ~N(0, (||W_hat - W|| / ||W||)^2). Zeroed codes (norm -100%), rescaled scales or negated codes
# (projections flip sign: O(1) changes) are far outside.
_QUANT_NORM_RTOL = 2.0**-3
_QUANT_PROJ_ATOL = 0.25
# The saved bias is the float layer's bias (float32); a model loaded in bfloat16 rounds each element by at most 2^-8
_BIAS_RTOL = 2.0**-7


def weight_projections(weight: torch.Tensor) -> list[float]:
    """``weight`` projected on fixed random sign vectors (seeded by its size), divided by its norm: a cheap,
    dtype-tolerant signature that, unlike the norm, changes when the weights are negated, permuted or replaced by
    other weights of the same size (each value is O(1) for unrelated weights)."""
    w = weight.detach().float().reshape(-1).cpu()
    g = torch.Generator().manual_seed(w.numel())
    signs = torch.randint(0, 2, (_PROJECTIONS, w.numel()), generator=g, dtype=torch.int8).float() * 2 - 1
    norm = float(w.norm())
    return [float(v) / max(norm, 1e-30) for v in (signs @ w)]


def model_fingerprint(model: nn.Module) -> dict:
    """Identity of a float model: ``arch`` hashes parameter names and shapes, ``weights`` hashes their
    float32 values, ``norms`` the L2 norm of every Linear/Conv2d weight and ``projections`` its
    ``weight_projections`` (dtype-tolerant checks)."""
    arch, weights = hashlib.sha256(), hashlib.sha256()
    norms, projections = {}, {}
    state = model.state_dict()
    for name in sorted(state):
        t = state[name]
        arch.update(f"{name}:{tuple(t.shape)};".encode())
        weights.update(name.encode())
        weights.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            norms[name] = float(m.weight.detach().float().norm())
            projections[name] = weight_projections(m.weight)
    return {"arch": arch.hexdigest()[:16], "weights": weights.hexdigest()[:16], "norms": norms,
            "projections": projections}


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, model_id: str | None = None,
                   extra: dict | None = None) -> Path:
    """Write ``quant.safetensors`` + ``quant.json`` of a ``quantize``-d model into ``out_dir`` (created, with its
    missing parents). ``model_id``: the model's name, recorded for ``load_quantized`` to compare; ``extra``: a dict
    of JSON values stored as the file's ``extra``. A save that fails (e.g. an ``OSError`` naming the file on a full
    disk) removes the folders it created and leaves no new ``quant.safetensors`` without its ``quant.json``."""
    from safetensors.torch import save_file

    from .. import __version__

    if model_id is not None and not isinstance(model_id, str):
        raise ValueError(f"`model_id` must be a string (the model's name, e.g. 'digits-eps') or None, got {model_id!r}")
    if extra is not None:
        if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
            raise ValueError(f"`extra` must be a dict with string keys (stored as {META_FILE}'s 'extra') or None, got "
                             f"{extra!r:.80}")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"`extra` must hold JSON values only (it is stored in {META_FILE}): {exc}") from None
    layers = quant_layers(model)
    info = getattr(model, "fewstep_quant", None)
    if not layers or info is None:
        raise ValueError("`model` is not quantized (no QuantLayer / fewstep_quant metadata): run quantize first")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"`out_dir` {str(out)!r} exists and is not a directory")
    tensors: dict[str, torch.Tensor] = {}
    meta_layers = {}
    for name, q in layers.items():
        for g in range(q.groups):
            tensors[f"{name}.weight_q{g}"] = q.weight_q(g).detach().cpu().contiguous()
            tensors[f"{name}.weight_scale{g}"] = q.weight_scale(g).detach().cpu().contiguous()
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias.detach().cpu().contiguous()
        meta_layers[name] = {
            "kind": q.kind, "split": q.split, "shape": list(q.reference_weight().shape),
            "act": [{"scale": a.scale, "zero_point": a.zero_point} for a in q.act], "mode": q.mode,
        }
    fp = info["fingerprint"]
    meta = {
        "artifact": "fewstep-quant", "version": ARTIFACT_VERSION, "fewstep_version": __version__,
        "model_id": model_id, "model_arch_hash": fp["arch"], "model_weights_hash": fp["weights"],
        "weight_norms": {k: v for k, v in fp["norms"].items() if k in layers},
        "weight_projections": {k: v for k, v in fp.get("projections", {}).items() if k in layers},
        "bits": 8, "format": info["config"]["format"], "method": "ptq4dm-w8a8",
        "config": info["config"], "calibration": info["calibration"], "layers": meta_layers,
    }
    if extra:
        meta["extra"] = extra
    # both files carry one random id: a save interrupted between the two renames (new tensors beside an older
    # quant.json in the same folder) is refused by load_quantized instead of mixing two quantizations
    meta["save_id"] = uuid.uuid4().hex
    text = json.dumps(meta, indent=1) + "\n"
    created = first_missing_dir(out)  # the topmost folder this save creates (None: `out_dir` exists)
    out.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(out / TENSORS_FILE,
                     lambda p: save_file(tensors, str(p), metadata={"format": "pt", "save_id": meta["save_id"]}))
        try:
            atomic_write(out / META_FILE, lambda p: p.write_text(text))
        except BaseException:  # new tensors without their quant.json are no usable save
            (out / TENSORS_FILE).unlink(missing_ok=True)
            raise
    except BaseException:  # e.g. a full disk: a folder made for this save is removed again
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return out



def read_metadata(directory: str | os.PathLike) -> dict:
    """``quant.json`` of a saved quantization (``ValueError`` / ``FileNotFoundError`` when unusable)."""
    d = Path(directory)
    if not (d / META_FILE).is_file() or not (d / TENSORS_FILE).is_file():
        raise FileNotFoundError(f"`directory` {str(d)!r} holds no saved quantization ({META_FILE} + {TENSORS_FILE})")
    try:
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # also binary bytes in the file
        raise ValueError(f"{str(d / META_FILE)!r} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("artifact") != "fewstep-quant":
        raise ValueError(f"{str(d / META_FILE)!r} is not a fewstep quantization file")
    if meta.get("version") != ARTIFACT_VERSION:
        raise ValueError(f"{str(d / META_FILE)!r} has artifact version {meta.get('version')!r}; this fewstep reads "
                         f"version {ARTIFACT_VERSION}: re-run `fewstep quantize`")
    _check_meta(meta, d / META_FILE)
    return meta


def _check_meta(meta: dict, path: Path) -> None:
    """The fields ``load_quantized`` reads, with their types and ranges (a hand-edited or truncated file is a
    ``ValueError`` naming the field, not a KeyError or silently wrong numerics)."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{str(path)!r}: {what} (re-run `fewstep quantize` to write a fresh file)")

    for key, kind in (("layers", dict), ("weight_norms", dict), ("config", dict), ("calibration", dict),
                      ("model_arch_hash", str), ("model_weights_hash", str), ("format", str)):
        if not isinstance(meta.get(key), kind):
            raise bad(f"`{key}` must be a {kind.__name__}, got {type(meta.get(key)).__name__}")
    if meta["format"] not in FORMATS:
        raise bad(f"`format` must be one of {list(FORMATS)}, got {meta['format']!r}")
    bits = meta.get("bits", 8)
    if isinstance(bits, bool) or bits != 8:
        raise bad(f"`bits` must be 8 (fewstep stores 8-bit weights and activations), got {bits!r}")
    _check_signatures(meta, bad)
    for name, layer in meta["layers"].items():
        if not isinstance(layer, dict) or not {"kind", "split", "shape", "act"} <= set(layer):
            raise bad(f"layer {name!r} must list kind, split, shape and act")
        if "mode" in layer and layer["mode"] not in MODES:
            raise bad(f"layer {name!r}: `mode` must be one of {list(MODES)}, got {layer['mode']!r}")
        split, act = layer["split"], layer["act"]
        if isinstance(split, bool) or not isinstance(split, int) or split < 0:
            raise bad(f"layer {name!r}: `split` must be an integer >= 0, got {split!r}")
        if not isinstance(act, list) or len(act) != (2 if split else 1):
            raise bad(f"layer {name!r}: `act` must list {2 if split else 1} activation quantizer(s)")
        for a in act:
            scale, zero = (a.get("scale"), a.get("zero_point")) if isinstance(a, dict) else (None, None)
            problem = act_qparams_problem(scale, zero, meta["format"])
            if problem:
                raise bad(f"layer {name!r}: {problem}")
    # (after the layers: an edited `format` is named by the quantizers that do not fit it first)
    config_format = meta["config"].get("format", meta["format"])
    if config_format != meta["format"]:
        raise bad(f"`config.format` is {config_format!r} but `format` is {meta['format']!r}; they must agree")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_signatures(meta: dict, bad: Any) -> None:
    """``weight_norms``: one finite number >= 0 per quantized layer (0: an all-zero weight) and no other names;
    ``weight_projections`` (absent in older files): per quantized layer a list of ``_PROJECTIONS`` finite numbers
    (``weight_projections``'s signature). A NaN would switch the weight checks off (``abs(x - nan) > tol`` is False)."""
    layers, norms = meta["layers"], meta["weight_norms"]
    for name in layers:
        if name not in norms:
            raise bad(f"`weight_norms` lacks layer {name!r} (one norm per quantized layer)")
    for name, value in norms.items():
        if name not in layers:
            raise bad(f"`weight_norms` names {name!r}, which is no quantized layer of `layers`")
        if not _is_number(value) or value < 0:
            raise bad(f"`weight_norms` of layer {name!r} must be a finite number >= 0 (the float weight's L2 norm), "
                      f"got {value!r}")
    projections = meta.get("weight_projections", {})
    if not isinstance(projections, dict):
        raise bad(f"`weight_projections` must be a dict, got {type(projections).__name__}")
    for name, value in projections.items():
        if name not in layers:
            raise bad(f"`weight_projections` names {name!r}, which is no quantized layer of `layers`")
        if not isinstance(value, list) or len(value) != _PROJECTIONS or not all(_is_number(v) for v in value):
            raise bad(f"`weight_projections` of layer {name!r} must be a list of {_PROJECTIONS} finite numbers, got "
                      f"{value!r:.80}")


def _check_stored_weights(q: QuantLayer, meta: dict, name: str, path: Path) -> None:
    """The layer's stored 8-bit weights times their scales against the float weight's norm and projections that
    ``quant.json`` records (see ``_QUANT_NORM_RTOL``): catches zeroed, negated or foreign codes and rescaled scales."""
    w_hat = torch.cat([q.dequant_weight(g).cpu() for g in range(q.groups)], dim=1)
    saved = meta["weight_norms"][name]
    now = float(w_hat.double().norm())
    if not abs(now - saved) <= _QUANT_NORM_RTOL * max(saved, 1e-30):
        raise ValueError(f"{str(path)!r}: layer {name!r}'s stored weights times their scales have norm {now:.6g}, "
                         f"but {META_FILE} records the float weight's norm {saved:.6g} (quantization moves it by less "
                         f"than {_QUANT_NORM_RTOL:g} of it); the file is damaged: quantize again")
    recorded = meta.get("weight_projections", {}).get(name)
    if recorded is not None:
        got = weight_projections(w_hat)
        off = max(abs(a - b) for a, b in zip(got, recorded))
        if not off <= _QUANT_PROJ_ATOL:
            raise ValueError(f"{str(path)!r}: layer {name!r}'s stored weights times their scales are not the weights "
                             f"{META_FILE} records (a projection differs by {off:.3g}, quantization moves them by less "
                             f"than {_QUANT_PROJ_ATOL:g}: negated, permuted or foreign codes); the file is damaged: "
                             "quantize again")


def _check_model(meta: dict, model: nn.Module, model_id: str | None, strict: bool) -> None:
    where = f"saved for model {meta.get('model_id')!r}"
    if model_id is not None and meta.get("model_id") not in (None, model_id):
        raise ValueError(f"quantization {where}, but `model_id` is {model_id!r}")
    refuse_peft_adapters(model, f"quantization {where}")
    fp = model_fingerprint(model)
    modules = dict(model.named_modules())
    for name, layer in meta["layers"].items():
        m = modules.get(name)
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"quantization {where} does not fit this model: layer {name!r} is "
                             f"{'missing' if m is None else type(m).__name__}, expected a {layer['kind']}")
        if list(m.weight.shape) != layer["shape"]:
            raise ValueError(f"quantization {where} does not fit this model: layer {name!r} weight has shape "
                             f"{list(m.weight.shape)}, saved {layer['shape']}")
    if fp["arch"] != meta["model_arch_hash"]:
        raise ValueError(f"quantization {where} does not fit this model: architecture hash {fp['arch']} != saved "
                         f"{meta['model_arch_hash']} (other parameter names or shapes)")
    if strict and fp["weights"] != meta["model_weights_hash"]:
        raise ValueError(f"quantization {where}: weights hash {fp['weights']} != saved {meta['model_weights_hash']} "
                         "(other weights; strict=True requires the exact float32 weights)")
    check_weights_fit(fp, meta["weight_norms"], meta.get("weight_projections", {}), where)


def check_weights_fit(fp: dict, norms: dict, projections: dict, where: str, layers: Any = None) -> None:
    """Each quantized layer's saved weight norm and projections against a float model's fingerprint ``fp``
    (``layers``: only these names, e.g. a quantized module's layers out of its whole-model fingerprint)."""
    if layers is not None:
        norms = {k: v for k, v in norms.items() if k in layers}
        projections = {k: v for k, v in projections.items() if k in layers}
    for name, saved in norms.items():
        now = fp["norms"][name]
        if abs(now - saved) > _NORM_RTOL * max(abs(saved), 1e-12):
            raise ValueError(f"quantization {where} does not fit this model's weights: layer {name!r} weight norm "
                             f"{now:.6g} vs saved {saved:.6g} (calibrated on other weights)")
    for name, saved in projections.items():  # (older artifacts lack them)
        now = fp["projections"][name]
        if max(abs(a - b) for a, b in zip(now, saved)) > _PROJ_ATOL:
            raise ValueError(f"quantization {where} does not fit this model's weights: layer {name!r} has weights "
                             "of the same norm but other values (negated, permuted or another checkpoint)")


def load_quantized(model: nn.Module, directory: str | os.PathLike, mode: str = "fake", model_id: str | None = None,
                   inplace: bool = False, strict: bool = False) -> nn.Module:
    """Apply a saved quantization to the float ``model`` it was made from; returns the quantized model.

    Checks layer names/shapes, the architecture hash and each quantized layer's weight norm (``strict``:
    the exact float32 weights hash) against the metadata. ``mode``: execution mode of every layer.
    """
    import copy

    from safetensors import safe_open
    from safetensors.torch import load_file

    if mode not in SETTABLE_MODES:
        raise ValueError(f"`mode` must be one of {list(SETTABLE_MODES)}, got {mode!r}")
    check_bool("inplace", inplace)
    check_bool("strict", strict)
    if model_id is not None and not isinstance(model_id, str):
        raise ValueError(f"`model_id` must be a string (the model's name, e.g. 'digits-eps') or None, got {model_id!r}")
    meta = read_metadata(directory)
    _check_model(meta, model, model_id, strict)
    path = Path(directory) / TENSORS_FILE
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            save_id = (f.metadata() or {}).get("save_id")
    except Exception as exc:  # safetensors raises its own error types for truncated / foreign files
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({exc}); quantize again") from None
    if save_id != meta.get("save_id"):  # (a save from before the ids has none in either file)
        raise ValueError(f"{str(path)!r} and {META_FILE} in {str(Path(directory))!r} come from different saves (a "
                         "save interrupted between its two files, or files copied from two folders); quantize again")
    target = model if inplace else copy.deepcopy(model)
    fmt = meta["format"]
    device = next(target.parameters()).device
    built: dict[str, QuantLayer] = {}
    for name, layer_meta in meta["layers"].items():
        float_layer = target.get_submodule(name)
        groups = 2 if layer_meta["split"] else 1
        try:
            scales = [tensors[f"{name}.weight_scale{g}"] for g in range(groups)]
            stored = [tensors[f"{name}.weight_q{g}"] for g in range(groups)]
        except KeyError as exc:
            raise ValueError(f"{TENSORS_FILE} lacks tensor {exc.args[0]!r} listed in {META_FILE}") from None
        want = STORAGE_DTYPES[fmt]
        if any(t.dtype != want for t in stored):
            raise ValueError(f"{META_FILE} says format {fmt!r}, but {TENSORS_FILE} stores layer {name!r}'s weights as "
                             f"{stored[0].dtype} (expected {want}): the two files do not belong together")
        for g, codes in enumerate(stored):
            if fmt == "fp8" and not bool(torch.isfinite(codes.float()).all()):  # e4m3fn's NaN codes: 0x7F, 0xFF
                raise ValueError(f"{str(path)!r}: layer {name!r}'s weight_q{g} holds NaN codes (fp8 e4m3 weights must "
                                 "be finite); the file is damaged")
            if fmt == "int8" and codes.numel() and int(codes.min()) < -127:  # the symmetric grid is [-127, 127]
                raise ValueError(f"{str(path)!r}: layer {name!r}'s weight_q{g} holds the code {int(codes.min())}; int8 "
                                 "weights are symmetric, in [-127, 127]; the file is damaged")
        out_channels = float_layer.weight.shape[0]
        for g, scale in enumerate(scales):
            problem = weight_scale_problem(scale, out_channels)
            if problem:
                raise ValueError(f"{str(path)!r}: layer {name!r}'s weight_scale{g} {problem}; the file is damaged")
        # (the activation quantizers were checked with the rest of quant.json: _check_meta)
        acts = [ActQParams(float(a["scale"]), int(a["zero_point"]), fmt) for a in layer_meta["act"]]
        q = QuantLayer(float_layer, scales, acts, fmt, layer_meta["split"], mode="fake", name=name)
        for g in range(groups):  # the stored 8-bit weights are the truth (not a re-rounding of the float ones)
            dest = getattr(q, f"weight_q{g}")
            if stored[g].shape != dest.shape:  # copy_ would broadcast a smaller tensor silently
                raise ValueError(f"{str(path)!r}: layer {name!r}'s weight_q{g} has shape {tuple(stored[g].shape)}, "
                                 f"the model's layer needs {tuple(dest.shape)}; the file is damaged")
            dest.copy_(stored[g].to(device))
        _check_stored_weights(q, meta, name, path)
        if f"{name}.bias" in tensors and q.bias is not None:
            bias = tensors[f"{name}.bias"]
            if bias.shape != q.bias.shape or not bias.dtype.is_floating_point or not bool(torch.isfinite(bias).all()):
                raise ValueError(f"{str(path)!r}: layer {name!r}'s bias must be {tuple(q.bias.shape)} finite floats, "
                                 f"got a {bias.dtype} tensor of shape {tuple(bias.shape)}; the file is damaged")
            # the saved bias is the float layer's own (quantization keeps it): the model's bias, up to its dtype
            model_bias = q.bias.detach().double().cpu()
            off = float((bias.double() - model_bias).norm())
            if not off <= _BIAS_RTOL * float(model_bias.norm()):
                raise ValueError(f"{str(path)!r}: layer {name!r}'s bias differs from the model's by {off:.6g} (the "
                                 f"model's bias has norm {float(model_bias.norm()):.6g}; quantization keeps the bias "
                                 "as it is): the file is damaged or was made for other weights")
            q.bias.copy_(bias.to(device))
        try:
            q.set_mode(mode)
        except (ValueError, RuntimeError) as exc:
            raise type(exc)(f"layer {name!r}: {exc}") from exc
        built[name] = q
    for name, q in built.items():  # swapped only once every layer is built: a failure leaves `model` as it was
        _set_submodule(target, name, q)
    target.fewstep_quant = {"config": meta["config"], "calibration": meta["calibration"],
                            "fingerprint": {"arch": meta["model_arch_hash"], "weights": meta["model_weights_hash"],
                                            "norms": meta["weight_norms"],
                                            "projections": meta.get("weight_projections", {})},
                            "layers": {k: {"split": v["split"]} for k, v in meta["layers"].items()}}
    return target
