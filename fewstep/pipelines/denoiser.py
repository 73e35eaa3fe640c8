"""The denoiser a pipeline's loop calls: optionally a ``fewstep.quant`` quantized copy, optionally ``torch.compile``d.

``prepare_denoiser(model, quantized=..., quant_mode=..., compile=...)`` returns ``(module, call)``: ``module`` is
what the pipeline registers as its UNet/transformer (the float model, or the quantized copy; the float model
itself is never modified), ``call`` what the denoising loop calls (``module``, or ``torch.compile(module, ...)``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["prepare_denoiser", "check_compile", "check_denoiser_current", "unwrap_compiled", "COMPILE_MODES",
           "COMPILE_OPTIONS"]

#: ``torch.compile`` modes accepted by ``compile="<mode>"``
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: keys accepted in ``compile={...}`` (passed to ``torch.compile``)
COMPILE_OPTIONS = ("mode", "backend", "fullgraph", "dynamic", "options")


def unwrap_compiled(model: Any) -> Any:
    """The module a ``torch.compile`` wrapper runs (``pipe.unet = torch.compile(pipe.unet)``, diffusers' recipe,
    gives an ``OptimizedModule`` holding it as ``_orig_mod``), else ``model`` itself: what the model *is*."""
    if type(model).__name__ == "OptimizedModule":
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return model


def check_compile(compile: bool | str | Mapping[str, Any] | None) -> dict | None:
    """``compile`` as ``torch.compile`` keyword arguments (``None``: no compilation).

    ``False``/``None``: off; ``True``: ``torch.compile`` defaults; a mode name (:data:`COMPILE_MODES`); or a
    dict of :data:`COMPILE_OPTIONS` (e.g. ``{"backend": "aot_eager"}``)."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return {}
    if isinstance(compile, str):
        if compile not in COMPILE_MODES:
            raise ValueError(f"`compile` mode must be one of {list(COMPILE_MODES)}, got {compile!r}")
        return {"mode": compile}
    if isinstance(compile, Mapping):
        unknown = sorted(str(k) for k in compile if k not in COMPILE_OPTIONS)
        if unknown:
            raise ValueError(f"`compile` has unknown option(s) {unknown}; allowed: {list(COMPILE_OPTIONS)}")
        kw = dict(compile)
        if "mode" in kw and kw["mode"] is not None and kw["mode"] not in COMPILE_MODES:
            raise ValueError(f"`compile['mode']` must be one of {list(COMPILE_MODES)}, got {kw['mode']!r}")
        if "backend" in kw and not (isinstance(kw["backend"], str) or callable(kw["backend"])):
            raise ValueError(f"`compile['backend']` must be a backend name or callable, got {kw['backend']!r}")
        if isinstance(kw.get("backend"), str):
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            if kw["backend"] not in backends:
                raise ValueError(f"`compile['backend']` must be one of torch's backends {backends} (or a callable), "
                                 f"got {kw['backend']!r}")  # fmt: skip
        for flag in ("fullgraph", "dynamic"):
            if flag in kw and kw[flag] is not None and not isinstance(kw[flag], bool):
                raise ValueError(f"`compile['{flag}']` must be a bool (or None for dynamic), got {kw[flag]!r}")
        if "options" in kw and not isinstance(kw["options"], Mapping):
            raise ValueError(f"`compile['options']` must be a dict, got {type(kw['options']).__name__}")
        if isinstance(kw.get("options"), Mapping) and kw.get("backend", "inductor") == "inductor":
            import difflib

            import torch._inductor

            known = set(torch._inductor.list_options())
            for name in kw["options"]:
                if name not in known:
                    near = difflib.get_close_matches(str(name), sorted(known), n=3)
                    raise ValueError(f"`compile['options']` has {name!r}, not an inductor option (all of them: "
                                     f"torch._inductor.list_options()){'; did you mean ' + str(near) if near else ''}")
        if "mode" in kw and "options" in kw:
            raise ValueError("`compile` takes either 'mode' or 'options', not both (torch.compile's rule)")
        return kw
    raise ValueError(
        f"`compile` must be a bool, a mode in {list(COMPILE_MODES)} or a dict of {list(COMPILE_OPTIONS)}, "
        f"got {type(compile).__name__}"
    )


def _load_quantized(model: torch.nn.Module, quantized: Any, quant_mode: str | None) -> torch.nn.Module:
    from .. import quant

    if quant_mode is not None and quant_mode not in quant.SETTABLE_MODES:
        raise ValueError(f"`quant_mode` must be one of {list(quant.SETTABLE_MODES)}, got {quant_mode!r}")
    if isinstance(quantized, (str, os.PathLike)):
        path = Path(quantized)
        if not path.is_dir():
            raise ValueError(
                f"`quantized` must be a directory written by fewstep.quant.save_quantized (or a quantized module), "
                f"got {str(quantized)!r}: not a directory"
            )
        return quant.load_quantized(model, path, mode=quant_mode or "fake")
    if isinstance(quantized, torch.nn.Module):
        if getattr(quantized, "fewstep_quant", None) is None or not quant.quant_layers(quantized):
            raise ValueError(
                f"`quantized` module ({type(quantized).__name__}) is not a fewstep.quant model (made by "
                "fewstep.quant.quantize or load_quantized)"
            )
        if type(quantized) is not type(model):
            raise ValueError(
                f"`quantized` is a quantized {type(quantized).__name__} but this pipeline's denoiser is a "
                f"{type(model).__name__}"
            )
        quant.refuse_peft_adapters(model, "`quantized` (a module)")
        fingerprint = quantized.fewstep_quant.get("fingerprint") if isinstance(quantized.fewstep_quant, dict) else None
        if fingerprint is not None:
            now = quant.model_fingerprint(model)
            if fingerprint.get("arch") != now["arch"]:
                raise ValueError("`quantized` was made from a model of another architecture than this pipeline's "
                                 "denoiser")  # fmt: skip
            from ..quant.artifacts import check_weights_fit

            check_weights_fit(now, fingerprint.get("norms", {}), fingerprint.get("projections", {}),
                              "`quantized` (a module)", layers=quant.quant_layers(quantized))  # fmt: skip
        if quant_mode is not None:
            quant.set_mode(quantized, quant_mode)
        return quantized
    raise ValueError(
        f"`quantized` must be None, a directory written by fewstep.quant.save_quantized or a quantized module, "
        f"got {type(quantized).__name__}"
    )


def prepare_denoiser(
    model: torch.nn.Module,
    quantized: str | os.PathLike | torch.nn.Module | None = None,
    quant_mode: str | None = None,
    compile: bool | str | Mapping[str, Any] | None = False,
    attribute: str = "unet",
) -> tuple[torch.nn.Module, Any]:
    """``(module, call)`` for ``model`` (see the module docstring); ``attribute``: the pipeline attribute holding
    ``model`` (``"unet"`` or ``"transformer"``), for the messages.

    ``quantized``: a ``save_quantized`` directory (applied to a copy of ``model`` with ``load_quantized``, which
    checks it was calibrated on these weights; ``quant_mode`` one of ``quant.MODES`` or ``"auto"``, default
    ``"fake"``) or a module returned by
    ``quantize``/``load_quantized`` (``quant_mode``, when given, is set on it). ``compile``: see
    :func:`check_compile`."""
    if quant_mode is not None and quantized is None:
        raise ValueError(f"`quant_mode`={quant_mode!r} needs `quantized` (a quantization directory or module)")
    kwargs = check_compile(compile)
    inner = unwrap_compiled(model)
    if inner is not model:
        why = {"quantized": "its 8-bit copy would run uncompiled", "compile": "it would be compiled twice"}
        given = [name for name, value in (("quantized", quantized), ("compile", kwargs)) if value is not None]
        if given:
            raise ValueError(
                f"the pipeline's {type(inner).__name__} is a torch.compile wrapper, and `{given[0]}` "
                f"cannot go on it ({why[given[0]]}): give from_pipe the uncompiled module (pipe.{attribute} = "
                f"pipe.{attribute}._orig_mod) and pass compile=... to from_pipe"
            )
    if quantized is not None and any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "`quantized` needs the pipeline's denoiser weights to check the quantization against, but they are "
            "offloaded (on the meta device: accelerate's cpu_offload / sequential offload); put the 8-bit denoiser "
            "on a pipeline that is not offloaded"
        )
    module = model if quantized is None else _load_quantized(model, quantized, quant_mode)
    if quantized is not None:
        ref = next(model.parameters(), None)
        module.eval()
        if ref is not None:
            module.to(ref.device)  # a given module may live elsewhere; the pipeline's inputs are on ref's device
    if kwargs is None:
        return module, module
    try:
        call = torch.compile(module, **kwargs)
    except RuntimeError as exc:  # inductor options checked by torch.compile (names, value types)
        raise ValueError(f"`compile`={compile!r} was refused by torch.compile: {exc}") from None
    return module, call


def check_denoiser_current(module: Any, compiled_from: Any) -> None:
    """A pipeline's compiled denoiser runs the module it was compiled from: refuse to run after the pipeline's
    UNet/transformer was replaced (``pipe.unet = other``), which would silently sample with the old weights."""
    if compiled_from is not None and module is not compiled_from:
        raise ValueError(
            f"the pipeline's {type(module).__name__} was replaced after `compile=` compiled the previous one, which "
            "would still run; build the pipeline again with from_pipe(..., compile=...) for the new module"
        )


def check_savable(model: Any, where: str) -> None:
    """Refuse ``DiffusionPipeline.save_pretrained`` of a pipeline whose denoiser (``where``: its attribute name) is
    a fewstep-quantized module: diffusers would write the 8-bit layers under names its model classes do not know,
    and ``from_pretrained`` would give the model random weights. Names the way to save it instead."""
    from ..quant import quant_layers

    model = unwrap_compiled(model)
    if isinstance(model, torch.nn.Module) and quant_layers(model):
        raise ValueError(
            f"save_pretrained cannot write this pipeline: its {where} is quantized, and diffusers would reload it "
            f"with random weights. Write the quantization with fewstep.quant.save_quantized(<pipeline>.{where}, DIR) "
            f"and the full-precision pipeline with its own save_pretrained, then rebuild with from_pipe(pipe, "
            f"quantized=DIR)"
        )
