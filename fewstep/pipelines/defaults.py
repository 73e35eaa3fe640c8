"""The embedded default models that ship inside the package, and ``load_default``."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["DEFAULT_MODELS", "default_model_path", "load_default"]

#: name -> one-line description
DEFAULT_MODELS = {
    "digits-eps": "class-conditional UNet, epsilon prediction, DDPM linear VP schedule (CFG null class 10)",
    "digits-flow": "class-conditional UNet, rectified-flow velocity prediction (CFG null class 10)",
    "digits-mr": "mean-reverting (IR-SDE) restoration UNet: fills a 6x6 box erased from a digit",
    "digits-classifier": "small CNN digit classifier: logits and Frechet-distance features",
}

_ASSETS = Path(__file__).resolve().parent.parent / "assets"


def default_model_path(name: str) -> Path:
    """Directory of an embedded model; ``ValueError`` listing the available names for an unknown one."""
    if name not in DEFAULT_MODELS:
        raise ValueError(f"unknown default model {name!r}; available: {', '.join(DEFAULT_MODELS)}")
    path = _ASSETS / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"the embedded model {name!r} is missing from {path}; reinstall fewstep or run "
            f"`python scripts/train_digits.py {name}` to rebuild it"
        )
    return path


def _v3_default_time_grid() -> str:
    import inspect

    from ..samplers.dpm_solver_v3 import FewstepDPMSolverV3Scheduler

    return inspect.signature(FewstepDPMSolverV3Scheduler.__init__).parameters["time_grid"].default


def default_sampler_options(model: str, sampler: str | None, with_schedule: bool = False) -> dict:
    """Options a sampler needs to run on an embedded model out of the box: the shipped DPM-Solver-v3 EMS
    (``ems_file``/``ems_model``, and the time grid measured best with them) for ``dpm-solver-v3`` on a model
    that has them, and the same EMS for ``s3`` (searched schedules may use DPM-Solver-v3 steps); with
    ``with_schedule`` also the model's shipped searched schedules for ``s3`` (``s3_schedule``: picked by NFE in
    ``set_timesteps``) -- for callers that do not pass a schedule themselves -- and, on an embedded model, its name
    as ``s3_model``: a schedule given on top of these options (``fewstep generate --sampler-option
    s3_schedule=...``) that records another model is refused, even where the two share a noise schedule (a
    schedule that records no model still runs; an ``s3_model`` given with it wins); else nothing."""
    options: dict = {}
    if sampler in ("dpm-solver-v3", "s3"):
        from ..samplers.dpm_solver_v3 import SHIPPED_EMS, SHIPPED_EMS_TIME_GRID

        if model in SHIPPED_EMS:
            options = {"ems_file": model, "ems_model": model}
            if sampler == "dpm-solver-v3" and SHIPPED_EMS_TIME_GRID[model] != _v3_default_time_grid():
                # only where it is not the class default: a stated default would be carried into another sampler
                # built from this config (its from_config drops defaults only), which may not take it (flow models)
                options["time_grid"] = SHIPPED_EMS_TIME_GRID[model]
    if sampler == "s3" and with_schedule:
        from ..samplers.s3 import SHIPPED_SCHEDULES

        if model in SHIPPED_SCHEDULES:
            options["s3_schedule"] = model
        if model in DEFAULT_MODELS:
            options["s3_model"] = model
    return options


def load_default(
    name: str = "digits-eps",
    sampler: str | None = "unipc",
    device: str | torch.device | None = None,
    torch_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
):
    """Load an embedded model: a ready ``ClassConditionalPipeline`` (``digits-eps``, ``digits-flow``) or
    ``MeanRevertingPipeline`` (``digits-mr``) with ``sampler`` swapped in by ``from_config``, or the
    ``DigitsClassifier`` module for ``"digits-classifier"``. ``device`` and ``dtype`` (a floating ``torch.dtype``)
    move it there; ``torch_dtype`` is the same option under its older diffusers name (diffusers 0.42's
    ``from_pretrained`` takes ``dtype``), so either spelling works."""
    path = default_model_path(name)
    for arg, value in (("torch_dtype", torch_dtype), ("dtype", dtype)):
        if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
            raise ValueError(f"`{arg}` must be a floating torch.dtype (e.g. torch.float16), got {value!r}")
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"`dtype` {dtype} and `torch_dtype` {torch_dtype} disagree; they are one option (pass "
                         "`dtype` alone)")
    torch_dtype = dtype if dtype is not None else torch_dtype
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"`device` must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if name == "digits-classifier":
        if sampler not in (None, "unipc"):  # "unipc" is the default of the argument
            raise ValueError(f"`sampler` does not apply to 'digits-classifier' (a classifier, not a pipeline), "
                             f"got {sampler!r}")
        from .classifier import DigitsClassifier

        model = DigitsClassifier.from_pretrained(path).eval()
        moves = {k: v for k, v in (("device", device), ("dtype", torch_dtype)) if v is not None}
        return model.to(**moves) if moves else model
    from .class_conditional import ClassConditionalPipeline
    from .mean_reverting import MeanRevertingPipeline

    kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
    pipeline_class = MeanRevertingPipeline if name == "digits-mr" else ClassConditionalPipeline
    pipe = pipeline_class.from_pretrained(path, **kwargs)
    if sampler is not None:
        from .swap import swap_sampler

        swap_sampler(pipe, sampler, **default_sampler_options(name, sampler, with_schedule=True))
    if device is not None:
        # diffusers warns that float16 pipelines "cannot run" on the CPU; the embedded models do (tested)
        pipe = pipe.to(device, silence_dtype_warnings=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
