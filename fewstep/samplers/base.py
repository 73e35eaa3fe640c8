"""Shared machinery of fewstep's diffusers schedulers: config -> schedule -> grid -> plan -> step.

A concrete scheduler declares its config in ``__init__`` (diffusers' ``@register_to_config``), calls
``self._init_common()`` and implements ``_decisions(num_steps, final_is_clean)``. Everything numeric
is precomputed in ``set_timesteps`` (float64, host); ``step`` converts the model output to the
``(x0, eps)`` pair and runs the engine -- tensor arithmetic only, no host sync.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .._checks import check_bool, check_int, check_number, check_output_shape
from .._io import atomic_write
from ..solvers import grids
from ..solvers.engine import EngineState, Plan, StepDecision, compile_plan, restart_decisions
from ..solvers.momentum import MomentumStep
from ..solvers.parameterization import compute_dtype, normalize_prediction_type, resume_precision, to_pair
from ..solvers.schedules import (
    ZERO_SNR_ALPHA_BAR,
    FlowSchedule,
    FlowShift,
    NoiseSchedule,
    VPSchedule,
    is_flow_config,
)

__all__ = ["FewstepSchedulerOutput", "FewstepScheduler", "TIME_GRIDS", "FLOW_TIME_GRIDS", "SchedulerMixin"]

# Every module that defines a scheduler imports ``SchedulerMixin`` from here: a pipeline saved with a fewstep
# scheduler records the scheduler's module as its library, and diffusers' ``from_pretrained`` then looks for its
# loadable base classes (``SchedulerMixin``) *in that module*; without the name there it refuses to load the
# pipeline ("does not seem to have any of the loading methods").

TIME_GRIDS = ("spacing", "uniform_time", "uniform_lambda", "time_quadratic", "karras")
#: the time grids of every sampler but dpm-solver-v3 on a flow schedule (``FewstepScheduler._grid``)
FLOW_TIME_GRIDS = ("spacing",)


@dataclass
class FewstepSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample at the next grid point; ``pred_original_sample``: the ``x0`` used."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _grids_hint(scheduler: type, flow: bool) -> str:
    kind = "a flow" if flow else "a VP"
    return f"{scheduler.__name__} on {kind} schedule supports time_grid in {list(scheduler.time_grids(flow))}"


def _lu_lambdas_hint(scheduler: type, flow: bool) -> str:
    grids_ = scheduler.time_grids(flow)
    if "uniform_lambda" in grids_:
        return "for steps uniform in log-SNR use time_grid='uniform_lambda'"
    return (f"{scheduler.__name__} has no grid uniform in log-SNR on a flow schedule (it supports time_grid in "
            f"{list(grids_)}); dpm-solver-v3 has one: time_grid='uniform_lambda' with ems_file= or degenerated=True")


#: diffusers scheduler options that change the sampled trajectory but that fewstep does not implement: when a config
#: (a pipeline's, or the one given to ``from_config``) sets one to anything but these neutral values, building a
#: fewstep scheduler from it is an error rather than a silently different sampler. Value: (neutral values, hint); a
#: callable hint is given the scheduler class and whether the config is a flow one (the time grids differ).
_FOREIGN_OPTIONS: dict[str, tuple[tuple, str | Callable[[type, bool], str]]] = {
    "use_lu_lambdas": ((False, None), _lu_lambdas_hint),
    "use_exponential_sigmas": ((False, None), _grids_hint),
    "use_beta_sigmas": ((False, None), _grids_hint),
    "lambda_min_clipped": ((-float("inf"), None), "the steps are not clipped in log-SNR"),
    "variance_type": ((None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
                      "a model that also predicts its variance needs a wrapper returning the first C output "
                      "channels (the mean prediction)"),
    "invert_sigmas": ((False, None), "flow sigmas are not inverted"),
    "stochastic_sampling": ((False, None), "fewstep's flow samplers are deterministic ODE steps"),
    "timestep_type": (("discrete", None), "the model is fed the discrete model timestep; a model conditioned on "
                      "0.25 log(sigma) (SVD's 'continuous') needs a wrapper mapping one to the other"),
    "interpolation_type": (("linear", None), "sigmas are interpolated linearly in the timestep"),
}


def check_config_arg(config: Any) -> None:
    """``from_config``'s ``config`` is a mapping (diffusers fails on others with a bare TypeError)."""
    if config is not None and not isinstance(config, Mapping):
        raise ValueError(f"`config` must be a scheduler config (a dict or FrozenDict, e.g. pipe.scheduler.config), "
                         f"got {type(config).__name__}")  # fmt: skip


def check_foreign_options(config: Any, scheduler: type) -> None:
    """Refuse a config that asks for diffusers behaviour fewstep does not implement (``_FOREIGN_OPTIONS``; EDM
    parameterisations), naming the option, its value and the way out (what the ``scheduler`` class offers on this
    config)."""
    cfg = dict(config or {})
    source = str(cfg.get("_class_name") or "")
    if source.startswith("EDM") or "sigma_data" in cfg:
        raise ValueError(
            f"{scheduler.__name__} cannot be built from {source or 'an EDM'} config: EDM schedulers (sigma_data, "
            "precondition_outputs) parameterise the model without a beta schedule, which fewstep's VP and flow "
            "schedules do not model"
        )
    for key, (neutral, hint) in _FOREIGN_OPTIONS.items():
        value = cfg.get(key)
        if value is None or value in neutral:
            continue
        origin = f"the {source} config" if source else "the scheduler config"
        if callable(hint):
            hint = hint(scheduler, is_flow_config(cfg) or getattr(scheduler, "process", None) == "flow")
        raise ValueError(
            f"{scheduler.__name__} does not implement diffusers' `{key}`={value!r} (from {origin}); {hint}. Remove "
            f"the key from the config to use fewstep's default ({neutral[0]!r})"
        )


class _InitSignature(NamedTuple):
    """What a scheduler class's ``__init__`` signature says about its options."""

    names: frozenset[str]  #: every option name
    bools: tuple[str, ...]  #: the options annotated ``bool`` (or ``bool | None``)
    defaults: dict[str, Any]  #: the options' defaults


@functools.cache
def _init_signature(cls: type) -> _InitSignature:
    """The ``__init__`` options of a scheduler class, read once per class (``step`` asks, host-side only)."""
    params = inspect.signature(cls.__init__).parameters
    bools = []
    for name, param in params.items():
        note = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", "")
        if note in ("bool", "bool | None"):
            bools.append(name)
    defaults = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
    return _InitSignature(frozenset(params), tuple(bools), defaults)


#: a flow config's settings that may reach ``from_config`` only as source defaults (``_use_default_values``)
_FLOW_SETTINGS = ("shift", "use_flow_sigmas", "flow_shift", "use_dynamic_shifting", "base_shift", "max_shift",
                  "base_image_seq_len", "max_image_seq_len", "shift_terminal", "time_shift_type")


def _flow_settings_kept(cls: type, config: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The flow settings ``cls.from_config(config, **kwargs)`` must pass explicitly so that a flow-matching config
    builds a flow scheduler: ``{}`` for a VP config or when a flow marker survives diffusers' filtering on its own.

    diffusers' ``from_config`` removes ``_class_name`` and the keys named in ``_use_default_values`` (those the source
    scheduler left at its own defaults) before calling ``__init__``; a FlowMatch config with the default ``shift``
    (1.0) then carries none of ``is_flow_config``'s markers. The removed flow settings whose value differs from
    ``cls``'s own default are returned (the values the source sampled with); when that is still no marker (a bare
    ``{"_class_name": "FlowMatchEulerDiscreteScheduler"}``), ``shift=1.0``, the FlowMatch default. Keywords given by
    the caller always win."""
    raw = {**dict(config or {}), **kwargs}
    if not is_flow_config(raw):
        return {}
    options, defaults = _init_signature(cls).names, _init_signature(cls).defaults
    dropped = set(raw.get("_use_default_values") or ()) - set(kwargs)
    survives = {k: v for k, v in raw.items() if k in options and k not in dropped}
    if is_flow_config(survives):
        return {}
    kept = {k: raw[k] for k in _FLOW_SETTINGS
            if k in dropped and k in raw and k in options and raw[k] != defaults.get(k, inspect.Parameter.empty)}
    if not is_flow_config({**survives, **kept}) and "shift" in options and "shift" not in kwargs:
        kept["shift"] = 1.0
    return kept


#: the settings that define a VP model's noise schedule: they must come from the source config, its defaults included
_VP_SCHEDULE_SETTINGS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                         "rescale_betas_zero_snr")


def _diffusers_class_defaults(class_name: Any) -> dict[str, Any]:
    """The ``__init__`` defaults of the diffusers scheduler class ``class_name`` names (``{}`` for other names)."""
    import diffusers

    if not isinstance(class_name, str) or not class_name.endswith("Scheduler"):
        return {}
    try:
        source = getattr(diffusers, class_name, None)
    except Exception:  # diffusers' lazy import of an optional backend
        return {}
    if not isinstance(source, type) or not issubclass(source, ConfigMixin):
        return {}
    return _init_signature(source).defaults


def _vp_schedule_kept(cls: type, config: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The noise-schedule settings ``cls.from_config(config, **kwargs)`` must pass explicitly so that a VP model's
    own schedule is sampled: those the source scheduler left at *its* defaults where they differ from ``cls``'s.

    diffusers' ``from_config`` drops the keys named in ``_use_default_values`` before ``__init__``, so the new class's
    own defaults replace them: an ``UnCLIPScheduler`` config (Kandinsky's prior: cosine betas by its default) or an
    ``LCMScheduler`` one (scaled-linear 0.00085-0.012) sampled linear betas (``alphas_cumprod`` up to 0.45 off). A
    saved config that omits them (a hub JSON) takes them from the diffusers class its ``_class_name`` names. Keywords
    given by the caller always win; flow configs have no betas."""
    raw = {**dict(config or {}), **kwargs}
    if is_flow_config(raw):
        return {}
    options, defaults = _init_signature(cls).names, _init_signature(cls).defaults
    dropped = set(raw.get("_use_default_values") or ()) - set(kwargs)
    source_defaults = _diffusers_class_defaults(raw.get("_class_name"))
    kept = {}
    for key in _VP_SCHEDULE_SETTINGS:
        if key not in options or key in kwargs:
            continue
        if key in raw and key in dropped:
            value = raw[key]
        elif key not in raw and key in source_defaults:
            value = source_defaults[key]
        else:
            continue
        if value != defaults.get(key, inspect.Parameter.empty):
            kept[key] = value
    return kept


_STEP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _step_dtype(**tensors: Any) -> torch.dtype:
    """The dtype ``step`` computes in (float32 for half-precision samples), after checking that each named input is a
    real floating tensor (a dtype test: no host sync). Integer samples were stepped and truncated silently, float8
    ones failed inside torch."""
    _check_floating(**tensors)
    return compute_dtype(tensors["sample"].dtype)


def _check_floating(**tensors: Any) -> None:
    """Each named input must be a real floating tensor (float16, bfloat16, float32 or float64)."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in _STEP_DTYPES:
            raise ValueError(f"`{name}` must be a floating tensor (float16, bfloat16, float32 or float64), got "
                             f"{str(value.dtype).replace('torch.', '')}")


def _check_variance_noise(variance_noise: torch.Tensor, sample: torch.Tensor) -> None:
    """A step's given noise (diffusers' ``variance_noise``): a floating tensor of the sample's shape (metadata only)."""
    _step_dtype(variance_noise=variance_noise, sample=sample)
    if variance_noise.shape != sample.shape:
        raise ValueError(f"`variance_noise` must have the sample's shape {tuple(sample.shape)}, got "
                         f"{tuple(variance_noise.shape)}")


def _check_output_shape(sample: torch.Tensor, **outputs: torch.Tensor) -> None:
    """Each model output (``model_output``, or ``x0``/``eps``) must have the sample's shape (metadata only: no sync).
    Without the check a CFG loop that forgot to split ``[uncond, cond]`` was broadcast silently (a batch of 1 came back
    as 2), and a learned-variance model's ``2C``-channel output failed inside torch."""
    check_output_shape(sample, **outputs)


def _without_unset_solver_options(cls: type, config: Any) -> Any:
    """``config`` without a ``solver_order``/``solver_type`` of None where ``cls`` has a real default for it. hb and
    ghvb write None for "the base's own" (and for a copied value their base does not use); in memory diffusers lists
    such keys as defaults, but ``save_pretrained`` does not keep that list, so a reloaded config carries explicit
    nulls that DPM-Solver++/UniPC/dc-solver would refuse ("`solver_order` must be an integer ..., got None")."""
    if not isinstance(config, Mapping):
        return config
    defaults = _init_signature(cls).defaults
    unset = [k for k in ("solver_order", "solver_type") if k in config and config[k] is None
             and defaults.get(k) is not None]  # fmt: skip
    return {k: v for k, v in config.items() if k not in unset} if unset else config


class FewstepScheduler(SchedulerMixin, ConfigMixin):
    """Base class (not registered): a multistep scheduler driven by the unified engine."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler"]
    order = 1
    #: the process this sampler's ``step`` solves (``samplers.PROCESSES``): ``"diffusion"`` (VP and flow
    #: configs), ``"flow"`` (flow configs only) or ``"mean-reverting"`` (its ``step`` takes ``mu``).
    process = "diffusion"
    #: spacing flavour of diffusers' timesteps this scheduler mirrors ("multistep" or "ddim").
    spacing_style = "multistep"
    #: flow grid (see ``grids.flow_grid``): "multistep" (UniPC's ``use_flow_sigmas`` grid, whose last
    #: evaluation is well away from s = 0, which suits multistep solvers), "dpmsolver" or "flowmatch".
    flow_grid_style = "multistep"
    #: ``step(..., return_dict=False)`` returns ``(prev_sample, pred_original_sample)`` instead of
    #: ``(prev_sample,)``: the tuple of the diffusers scheduler this one replaces (DDIM's has both).
    tuple_with_x0 = False

    #: config keys whose string value may name an artifact file, each with the shipped names it also takes (those
    #: are not files): ``save_pretrained`` copies such files into the saved folder and ``from_pretrained`` finds them
    #: there, so a saved scheduler (or pipeline) depends neither on the working directory nor on outside files.
    _artifact_config_keys: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------------------
    # construction
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, plus a copy of every artifact file the config names (EMS tables, solver
        schedules, DC ratio/CPR files), stored as ``<key><suffix>`` beside ``scheduler_config.json``, whose entry
        then names the copy. Shipped names (e.g. ``"digits-eps"``) and inline values are kept as they are."""
        for key, shipped in self._artifact_config_keys.items():  # before anything is written
            value = self.config.get(key)
            if isinstance(value, (str, os.PathLike)) and value not in shipped and not Path(value).is_file():
                where = "" if os.path.isabs(value) else f" (from {os.getcwd()!r})"
                raise ValueError(f"`{key}`={str(value)!r} names no file{where} and no shipped name "
                                 f"({', '.join(shipped) or 'none'}): the saved scheduler would lack it (what was "
                                 "read from it is not written back); restore the file, or rebuild the scheduler "
                                 "from one that exists")
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        folder = Path(save_directory)
        copies = {}
        for key, shipped in self._artifact_config_keys.items():
            value = self.config.get(key)
            if not isinstance(value, (str, os.PathLike)) or value in shipped:
                continue  # a shipped name, an inline value or None
            name = key + "".join(Path(value).suffixes)
            if Path(value).resolve() != (folder / name).resolve():
                atomic_write(folder / name, lambda tmp, src=value: shutil.copyfile(src, tmp))
            copies[key] = name
        if copies:
            config_file = folder / self.config_name
            config = json.loads(config_file.read_text())
            config.update(copies)
            atomic_write(config_file, lambda tmp: tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))

    @classmethod
    def time_grids(cls, flow: bool) -> tuple[str, ...]:
        """The ``time_grid`` values this sampler samples with on a flow (``flow=True``) or VP config (``_grid``):
        ``FLOW_TIME_GRIDS`` or ``TIME_GRIDS``."""
        return FLOW_TIME_GRIDS if flow else TIME_GRIDS

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None = None,
                        subfolder: str | None = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_pretrained``; an artifact entry of a local config that names a file relative to the
        config's folder (as ``save_pretrained`` writes them) is resolved against that folder."""
        folder = Path(pretrained_model_name_or_path or ".", subfolder or "")
        config_file = folder / cls.config_name
        if cls._artifact_config_keys and config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except (OSError, ValueError):
                config = {}  # diffusers' own loader reports the malformed file
            for key, shipped in cls._artifact_config_keys.items():
                value = config.get(key) if isinstance(config, dict) else None
                if key in kwargs or not isinstance(value, str) or value in shipped or os.path.isabs(value):
                    continue
                # a relative name is the folder's own file (save_pretrained writes them so); never one of the
                # working directory's, which would silently load other tables
                if not (folder / value).is_file():
                    raise ValueError(f"{str(config_file)!r} names the {key} file {value!r}, which is missing from "
                                     f"{str(folder)!r}; restore it or pass {key}= explicitly")
                kwargs[key] = str((folder / value).resolve())
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder,
                                       return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """diffusers' ``from_config``, after refusing options of the source config that would change the result
        and that fewstep does not implement (``check_foreign_options``): diffusers drops such keys silently.

        A flow-matching source config (``is_flow_config`` of the config as given) stays a flow config: diffusers
        drops ``_class_name`` and every key the source left at its default (``_use_default_values``) before
        ``__init__``, so ``FlowMatchEulerDiscreteScheduler().config`` (default ``shift``) or a default ``flow-euler``
        config would otherwise arrive with no flow marker and build a VP scheduler. Their flow settings are passed
        on explicitly (``_flow_settings_kept``)."""
        check_config_arg(config)
        config = _without_unset_solver_options(cls, config)
        check_foreign_options({**dict(config or {}), **kwargs}, cls)
        kwargs = {**_flow_settings_kept(cls, config, kwargs), **_vp_schedule_kept(cls, config, kwargs), **kwargs}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        """diffusers' compatible classes (``_compatibles``, which diffusers looks up by name in its own namespace
        only) plus every registered fewstep scheduler. ``from_config`` keeps a compatible class's options in the
        config without warning about them; without the fewstep classes here, a swap from one fewstep sampler to
        another (``hb`` -> ``unipc``) logged "The config attributes {'momentum_order': ...} were passed to ... but
        are not expected" for fewstep's own options."""
        from . import _REGISTRY  # the registry imports this module

        own = [c for c in _REGISTRY.values() if c is not cls]
        return [*super()._get_compatibles(), *own]

    @classmethod
    def _declares(cls, key: str) -> bool:
        """Whether ``key`` is one of this scheduler's own ``__init__`` options. diffusers' ``from_config`` also
        copies the source config's other keys onto ``self.config`` (a DDPM config's ``clip_sample`` lands on a
        UniPC built from it), so an option a class does not declare must never be read from its config."""
        return key in _init_signature(cls).names

    def register_to_config(self, **kwargs: Any) -> None:
        """diffusers' ``register_to_config``; a value registered after ``__init__`` began (a setting fewstep derives,
        e.g. ``prediction_type="flow_prediction"`` on a flow config) is no longer listed as a default
        (``_use_default_values``): diffusers' ``from_config`` drops listed keys, so a diffusers scheduler built from
        this config would otherwise get its own default instead (an epsilon UniPC on a flow model)."""
        super().register_to_config(**kwargs)
        used = getattr(self, "_internal_dict", {}).get("_use_default_values")
        if used and "_use_default_values" not in kwargs and any(k in used for k in kwargs):
            super().register_to_config(_use_default_values=[k for k in used if k not in kwargs])

    def _anchor_artifact_files(self) -> None:
        """Register every artifact file the config names by a relative path (``_artifact_config_keys``) as its
        absolute path, resolved against the working directory of construction, where it was read: a relative
        name stayed in the config and ``from_config(self.config)``, ``save_pretrained`` (and DC's lazily read ratio
        table) read it again from whatever the working directory was then -- another file of the same name, or none.
        Shipped names, absolute paths and inline values are kept as given. Call it at the end of ``__init__``."""
        anchored = {}
        for key, shipped in self._artifact_config_keys.items():
            value = self.config.get(key)
            if isinstance(value, (str, os.PathLike)) and value not in shipped and not os.path.isabs(value):
                anchored[key] = str(Path(value).resolve())
        if anchored:
            self.register_to_config(**anchored)

    def _init_common(self) -> None:
        """Schedule, prediction type and the shared option checks, from the registered config.

        On a flow-matching config (``is_flow_config``) the model is taken to predict the velocity
        (``self.prediction_type == "flow"``; the config stores diffusers' ``"flow_prediction"``) when the config
        says ``"flow_prediction"``, ``"flow"`` or ``"epsilon"``: SD3/Flux configs
        carry no prediction type (the class default ``"epsilon"`` then fills it), and diffusers writes that default
        into every saved config, so a stated ``"epsilon"`` cannot be told from a default. (diffusers' UniPC and
        DPM-Solver honour an explicit epsilon with ``use_flow_sigmas``, where ``x0 = (x - s eps) / (1 - s)``
        multiplies the model's error by up to 1e6 at the first point.) ``sample`` and ``v_prediction`` are
        honoured as given.
        """
        cfg = self.config
        for name in _init_signature(type(self)).bools:  # "False" (a CLI or JSON string) is truthy: refuse, never guess
            value = cfg.get(name)  # None: unset, as diffusers reads it (a hub config's null)
            if value is not None:
                check_bool(name, value, numpy_ok=True)
        flow = is_flow_config(dict(cfg))
        if flow:
            self.noise_schedule: NoiseSchedule = FlowSchedule.from_config(cfg)
            if cfg.prediction_type in ("epsilon", "flow"):
                # Flow configs (SD3/Flux) carry no prediction_type: their models predict the velocity. Stored in
                # diffusers' spelling, so that diffusers' UniPC/DPM-Solver built back from this config step it.
                self.register_to_config(prediction_type="flow_prediction")
            self._state_flow_for_diffusers()
        else:
            self.noise_schedule = VPSchedule.from_config(cfg)
        self.prediction_type = normalize_prediction_type(self.config.prediction_type)
        if self.config.timestep_spacing not in grids.SPACINGS:
            raise ValueError(
                f"`timestep_spacing` must be one of {list(grids.SPACINGS)}, got {self.config.timestep_spacing!r}"
            )
        if self.config.final_sigmas_type not in grids.FINAL_SIGMAS:
            raise ValueError(
                f"`final_sigmas_type` must be one of {list(grids.FINAL_SIGMAS)}, got {self.config.final_sigmas_type!r}"
            )
        if self.config.time_grid not in TIME_GRIDS:
            raise ValueError(f"`time_grid` must be one of {list(TIME_GRIDS)}, got {self.config.time_grid!r}")
        if self.config.thresholding:
            way_out = "set thresholding=False"
            if self._declares("clip_sample"):
                way_out += ", or clip_sample=True (with clip_sample_range) to clamp x0 to a fixed range"
            raise ValueError(f"`thresholding`={self.config.thresholding!r}: {type(self).__name__} does not implement "
                             f"diffusers' dynamic thresholding (allowed: False); {way_out}")  # fmt: skip
        if self.config.time_shift_type != "exponential":
            raise ValueError(f"`time_shift_type` must be 'exponential', got {self.config.time_shift_type!r}")
        check_int("steps_offset", getattr(self.config, "steps_offset", 0), 0)
        self._check_clip_sample()
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(self.noise_schedule.num_train_timesteps)[::-1].copy())
        self.sigmas: torch.Tensor | None = None
        self.plan: Plan | None = None
        self._state: EngineState | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._timestep_values: list[float] = []
        self._compiled: tuple[grids.TimeGrid, list[StepDecision]] | None = None  # set_timesteps' grid, decisions
        self._plan_start = 0  # the grid point the current plan's warm-up starts at (set_begin_index)
        self._plan_device: torch.device | None = None  # set_timesteps' device (where the plan's tensors go)

    @property
    def is_flow(self) -> bool:
        return isinstance(self.noise_schedule, FlowSchedule)

    # ----------------------------------------------------------------------------------------------
    # diffusers bookkeeping
    @property
    def step_index(self) -> int | None:
        """Index of the next step to run (``None`` before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at model call ``begin_index`` (img2img pipelines call it after ``set_timesteps``, then step from
        ``timesteps[begin_index]``). The run starts with an empty buffer there, so the plan is recompiled with the
        multistep warm-up moved to that step (``solvers.engine.restart_decisions``), as diffusers' schedulers
        count their lower-order warm-up from the first step they take.

        A step with an implicit corrector (``s3``) has two model calls at its grid point, and a pipeline that
        only sets ``strength`` may begin at either. No step ran before the first one, so there is nothing to
        correct: begun at the step's first call, the corrected point is the sample itself and the second call
        evaluates the model there again (one redundant call, so that the loop stays one call per timestep); begun
        at its second call, that call is the step's only evaluation and the run continues as from the step's
        first call without a corrector. Either way the run has exactly ``len(timesteps) - begin_index`` calls."""
        if isinstance(begin_index, torch.Tensor) and begin_index.numel() == 1 and not begin_index.is_floating_point():
            begin_index = int(begin_index.reshape(()))  # as diffusers, which stores whatever it is given
        begin_index = check_int("begin_index", begin_index, 0)
        if self.plan is not None and self._compiled is not None:
            calls = self.plan.calls
            if begin_index >= len(calls):
                raise ValueError(
                    f"`begin_index` must be below the number of timesteps ({len(calls)}), got {begin_index} (allowed: "
                    f"0 to {len(calls) - 1}): no model call would be left to run. In an img2img or inpaint pipeline "
                    f"this means `strength` is too small for `num_inference_steps` (strength * num_inference_steps "
                    "< 1 leaves no step): raise `strength` or `num_inference_steps`"
                )
            point = calls[begin_index][0]
            if point != self._plan_start:  # (begin_index 0 right after set_timesteps: nothing to recompile)
                grid, decisions = self._compiled
                hooks = self._state.hooks if self._state is not None else ()
                run = restart_decisions(decisions, point) if point > 0 else list(decisions)
                self._install_plan(grid, run, hooks, start=point)
                self.plan.prepare_tensors(self._plan_device)
                self._plan_start = point
            self._step_index = None
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.noise_schedule.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """No input scaling: fewstep schedulers feed ``x_t`` itself to the model -- except at the first call after
        an ``average_x0`` analytical first step (s3), where ``x_1 = init_noise_sigma * noise + offset * mean``
        and diffusers pipelines have applied only ``init_noise_sigma``: the mean's share is added here (and
        by ``step`` to the sample it receives at that call)."""
        return self.model_sample(0 if self._step_index is None else self._step_index, sample)

    def model_sample(self, k: int, sample: torch.Tensor) -> torch.Tensor:
        """The sample the model is called at for call ``k``, given the pipeline's ``sample``: itself, except at the
        first call after an ``average_x0`` analytical first step (see ``scale_model_input``)."""
        start = self.plan.analytic_start if self.plan is not None else None
        if k != 0 or start is None or start.mean is None:
            return sample
        return sample + start.shift(sample)

    # ----------------------------------------------------------------------------------------------
    # set_timesteps
    def _decisions(self, num_steps: int, final_is_clean: bool) -> list[StepDecision]:  # pragma: no cover
        raise NotImplementedError

    def _grid_decisions(self, grid: grids.TimeGrid) -> list[StepDecision]:
        """The decisions for a built grid (schedulers whose decisions depend on the grid's times override this)."""
        return self._decisions(grid.num_steps, grid.clean_end)

    def _compile_plan(self, grid: grids.TimeGrid, decisions: list[StepDecision]) -> Plan:
        """Decisions -> engine plan (DPM-Solver-v3 adds its EMS tables here)."""
        return compile_plan(grid, decisions)

    def _install_plan(self, grid: grids.TimeGrid, decisions: list[StepDecision], hooks: Any = (), start: int = 0
                      ) -> None:
        """Compile ``decisions`` on ``grid`` into ``self.plan`` (with momentum from grid point ``start``, where the
        run begins) and start a fresh engine state with ``hooks``: nothing leaks between runs (schedulers that add
        their own hooks or tables override this)."""
        self.plan = self._compile_plan(grid, decisions)
        if self.plan.analytic_start is None:
            self.plan.momentum = self._momentum(grid, decisions, start)
        self._state = EngineState(self.plan, hooks)

    def _momentum(self, grid: grids.TimeGrid, decisions: list[StepDecision], start: int = 0
                  ) -> list[MomentumStep | None] | None:
        """Momentum around the engine's steps (heavy-ball schedulers); ``None``: plain steps."""
        return None

    def _flow_shift(self, mu: float | None) -> FlowShift:
        """The flow config's shift: dynamic (``e^mu``, Flux) or static (``shift``, else ``flow_shift``)."""
        cfg = self.config
        if cfg.use_dynamic_shifting:
            if mu is None:
                raise ValueError("`mu` must be passed to set_timesteps when `use_dynamic_shifting=True`")
            return FlowShift.from_mu(mu)  # a number: set_timesteps checked it
        name = "shift" if cfg.shift is not None else "flow_shift"
        value = cfg.shift if cfg.shift is not None else cfg.flow_shift
        return FlowShift(check_number(name, value, 0.0, low_open=True, what="the flow time shift"))

    def _apply_flow_shift(self, s: np.ndarray, mu: float | None, clean_end: bool = False) -> np.ndarray:
        """Flow times ``s`` shifted as diffusers' flow schedulers shift theirs: by ``shift`` (or ``e^mu``), then,
        when the config sets ``shift_terminal``, stretched as ``1 - s' = (1 - s) (1 - shift_terminal) / (1 - s_N)``
        so the last point sits at ``s_N' = shift_terminal`` (diffusers' ``stretch_shift_to_terminal``, LTX-Video).
        That needs two points or more: a single point would be moved onto ``shift_terminal`` itself (or to NaN at
        ``s = 1``), so one is refused. ``clean_end``: the user's list went on to a trailing 0 (taken off ``s``);
        diffusers stretches that 0 with the rest (onto ``shift_terminal``), so with ``shift_terminal`` it is
        returned as one more point, there."""
        s = self._flow_shift(mu).apply(np.asarray(s, dtype=np.float64))
        if clean_end and self.config.shift_terminal:
            s = np.append(s, 0.0)
        if self.config.shift_terminal:
            grids.check_shift_terminal_points(self.config.shift_terminal, s.size, f"{s.size} flow sigma(s)/timestep(s)")
            one_minus = 1.0 - s
            s = 1.0 - one_minus / (one_minus[-1] / (1.0 - self.config.shift_terminal))
        return s

    def _shifted_flow_grid(self, timesteps, sigmas, mu) -> grids.TimeGrid:
        """User ``sigmas`` (or ``timesteps / T``) on a flow schedule, shifted as diffusers does -- the Flux
        pipeline passes ``sigmas=linspace(1, 1/N, N)`` plus ``mu`` -- then ``shift_terminal``; a model fed
        user ``timesteps`` still gets those."""
        T = self.noise_schedule.num_train_timesteps
        name = "sigmas" if sigmas is not None else "timesteps"
        raw = grids.check_decreasing(name, sigmas if sigmas is not None else timesteps)  # the user's own values
        given = raw / T if sigmas is None else raw
        clean_end = bool(given.size >= 2 and given[-1] == 0)
        if clean_end:
            given = given[:-1]
        if np.any(given <= 0) or np.any(given > 1):
            allowed = "(0, 1]" if sigmas is not None else f"(0, {T}] (a trailing 0 marks the clean target)"
            raise ValueError(f"flow `{name}` must lie in {allowed}, got {raw.tolist()}")
        s = grids.clamp_flow_top(self._apply_flow_shift(given, mu, clean_end),
                                 f"flow `{name}` {raw.tolist()} after the shift")  # alpha = 0: lambda = -inf
        times = s * T if timesteps is None else grids.as_numbers("timesteps", timesteps)[: s.size]
        return grids.TimeGrid(times, np.append(1.0 - s, 1.0), np.append(s, 0.0))

    def _grid(self, num_inference_steps, timesteps, sigmas, mu) -> grids.TimeGrid:
        cfg = self.config
        sched = self.noise_schedule
        final = cfg.final_sigmas_type
        if isinstance(sched, FlowSchedule):
            if cfg.use_karras_sigmas:
                raise ValueError("`use_karras_sigmas=True` is not supported on a flow-matching schedule (the steps "
                                 "follow the shifted flow sigmas); set it to False")  # fmt: skip
            if final != "zero":
                raise ValueError(f"`final_sigmas_type`={final!r}: flow-matching schedules end on clean data here; "
                                 "use 'zero'")  # fmt: skip
            if timesteps is not None or sigmas is not None:
                # as FlowMatchEulerDiscreteScheduler: user timesteps are sigmas * T, shifted like any others
                return self._shifted_flow_grid(timesteps, sigmas, mu)
        if timesteps is not None:
            return grids.custom_timesteps_grid(sched, timesteps, final)
        if sigmas is not None:
            return grids.custom_sigmas_grid(sched, sigmas, final, round_timesteps=True)
        if isinstance(sched, FlowSchedule):
            shift = self._flow_shift(mu)
            style = self.flow_grid_style
            if cfg.time_grid not in FLOW_TIME_GRIDS:
                raise ValueError(
                    f"`{type(self).__name__}` on a flow schedule supports time_grid='spacing' only, got "
                    f"{cfg.time_grid!r} (only dpm-solver-v3 warps other grids by the flow shift; a config built from "
                    "a dpm-solver-v3 one keeps its time_grid: pass time_grid='spacing')"
                )
            return grids.flow_grid(
                sched, num_inference_steps, shift, style=style, dynamic=bool(cfg.use_dynamic_shifting),
                shift_terminal=cfg.shift_terminal or None,  # diffusers reads 0 as unset
            )
        grid_name = "karras" if cfg.use_karras_sigmas else cfg.time_grid
        if grid_name == "spacing":
            return grids.spacing_grid(
                sched, num_inference_steps, cfg.timestep_spacing, cfg.steps_offset, final, style=self.spacing_style
            )
        if grid_name == "karras":
            # diffusers' Karras grids take the config's sigma_min / sigma_max when it has them (Euler's keys, kept
            # in the config as extra entries), else the schedule's own range
            bounds = {k: getattr(cfg, k, None) for k in ("sigma_min", "sigma_max")}
            if bounds["sigma_max"] is None and getattr(cfg, "rescale_betas_zero_snr", False):
                # diffusers' Karras range starts at its zero-SNR stand-in alpha_bar = 2^-24 (rho = 4096), on every
                # beta schedule; fewstep's own last alpha_bar is that value unless 2^-24 would exceed the one
                # before it (linear betas), where it is half of that one: start where diffusers does there too
                bounds["sigma_max"] = math.sqrt((1.0 - ZERO_SNR_ALPHA_BAR) / ZERO_SNR_ALPHA_BAR)
            if bounds["sigma_min"] is not None and final != "zero":
                fa, fs = grids._final_from(sched, final)
                if bounds["sigma_min"] < fs / fa:
                    raise ValueError(
                        f"the config's `sigma_min`={bounds['sigma_min']!r} puts the last Karras point below the final "
                        f"target (final_sigmas_type={final!r}: sigma/alpha = {fs / fa:.4g}); raise `sigma_min` or "
                        "pass final_sigmas_type='zero'"
                    )
            return grids.karras_grid(sched, num_inference_steps, rho_min=bounds["sigma_min"],
                                     rho_max=bounds["sigma_max"], final_sigmas_type=final)  # fmt: skip
        builder = {
            "uniform_time": grids.uniform_time_grid,
            "uniform_lambda": grids.uniform_lambda_grid,
            "time_quadratic": grids.time_quadratic_grid,
        }[grid_name]
        return builder(sched, num_inference_steps, final_sigmas_type=final)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        sigmas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the time grid and compile the solver plan (all on the host, float64).

        Exactly one of ``num_inference_steps``, ``timesteps`` (model timesteps, strictly decreasing) or
        ``sigmas`` (``sigma/alpha`` for VP, ``s`` for flow; strictly decreasing) must be given; ``mu`` is the
        dynamic shift of flow models (Flux).
        """
        given = [x is not None for x in (timesteps, sigmas)]
        if sum(given) > 1:
            raise ValueError("pass at most one of `timesteps` and `sigmas`")
        if num_inference_steps is None and not any(given):
            raise ValueError("pass one of `num_inference_steps`, `timesteps` or `sigmas`")
        if num_inference_steps is not None:
            grids.check_num_steps(num_inference_steps, self.noise_schedule.num_train_timesteps)
        if mu is not None:  # checked on every config (a static one ignores it, but it must still be a number)
            mu = check_number("mu", mu, what="the log of the dynamic shift")
        if device is not None:
            torch.empty(0, device=device)  # an unusable device fails here, before anything of the old run changes
        grid = self._grid(num_inference_steps, timesteps, sigmas, mu)
        if num_inference_steps is not None and any(given) and grid.num_steps != num_inference_steps:
            raise ValueError(f"`num_inference_steps`={num_inference_steps} does not match the "
                             f"{'timesteps' if timesteps is not None else 'sigmas'} given, which make "
                             f"{grid.num_steps} steps")
        decisions = self._grid_decisions(grid)
        self._compiled = (grid, decisions)
        self._install_plan(grid, decisions)
        self._plan_device = torch.device(device) if device is not None else None
        self.plan.prepare_tensors(self._plan_device)  # EMS coefficients on the device now, not in `step`
        self._plan_start = 0
        if self.plan.analytic_start is None:
            self.init_noise_sigma = 1.0
        else:  # an analytical first step (s3): the model's first call is at the plan's (later) first point
            grid = self.plan.grid
            self.init_noise_sigma = self.plan.analytic_start.scale
        # one timestep per model call: a point whose step has an implicit corrector (s3) is called twice
        points = [i for i, _ in self.plan.calls]
        self.num_inference_steps = len(points)
        integral = np.all(grid.timesteps == np.round(grid.timesteps)) and not self.is_flow
        ts = torch.from_numpy(grid.timesteps[points].astype(np.int64 if integral else np.float32))
        self.timesteps = ts.to(device=device) if device is not None else ts
        levels = grid.rhos if not self.is_flow else grid.sigmas
        self.sigmas = torch.from_numpy(levels[[*points, grid.num_steps]]).to(torch.float32)
        self._timestep_values = ts.tolist()  # as the pipeline will pass them back (int64 or float32)
        self._step_index = None
        self._begin_index = None

    def add_step_hook(self, hook: Any) -> None:
        """Run ``hook(state, i)`` in every remaining step of the current run (after the corrector, before the
        predictor; see ``solvers.engine.EngineState``), e.g. a FlowChef steering hook. ``set_timesteps`` starts a
        fresh run without it."""
        if self._state is None:
            raise ValueError("call `set_timesteps` before `add_step_hook`")
        if not callable(hook):
            raise TypeError(f"`hook` must be callable as hook(state, i), got {type(hook).__name__}")
        self._state.hooks.append(hook)

    # ----------------------------------------------------------------------------------------------
    # step
    def _init_step_index(self, timestep: Any) -> None:
        """The first ``step`` of a run finds its model call: ``set_begin_index``'s, else the index of ``timestep``
        in ``self.timesteps``. A loop that starts part-way without ``set_begin_index`` (pipelines that iterate
        ``timesteps[t_start:]``, e.g. AnimateDiff video2video) begins there as if it had been called, warm-up
        included. The index comes from the tensor's place in ``self.timesteps`` when it is a view of it (metadata:
        no device sync), else from its value when it is a number or a CPU tensor; an accelerator tensor that is
        neither is not read back (no host sync) and starts the loop at the first step."""
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        index = self._view_index(timestep)
        if index is None:
            value = None
            if isinstance(timestep, (int, float, np.integer, np.floating)) and not isinstance(timestep, bool):
                value = float(timestep)
            elif isinstance(timestep, torch.Tensor) and timestep.numel() == 1:
                if timestep.device.type == "cpu":
                    value = float(timestep.reshape(()))  # CPU scalar: no device sync
            else:
                got = (f"a tensor of shape {tuple(timestep.shape)}" if isinstance(timestep, torch.Tensor)
                       else repr(timestep))
                raise ValueError(f"`timestep` must be one of this scheduler's timesteps (a number or a one-element "
                                 f"tensor), got {got}")  # fmt: skip
            if value is not None and value not in self._timestep_values:
                raise ValueError(f"timestep {value} is not in this scheduler's timesteps {self._timestep_values}")
            index = 0 if value is None else self._index_of_value(value)
        if index > 0:
            self.set_begin_index(index)  # restarts the warm-up there, as diffusers counts it from the first step
        self._step_index = index

    def _index_of_value(self, value: float, current: int | None = None) -> int:
        """The model call whose timestep is ``value``: ``current`` when its timestep is ``value``, else, as diffusers'
        ``index_for_timestep``, the second of a value listed at two grid points (a Karras grid's rounded timesteps
        repeat near the end: a loop begun there must not skip a level; one begun at the first place then runs out of
        steps, as in diffusers), else its first place (a value listed twice for one grid point, an s3 implicit
        corrector's two calls: a loop begun there runs both)."""
        values = self._timestep_values
        if current is not None and 0 <= current < len(values) and values[current] == value:
            return current
        places = [k for k, v in enumerate(values) if v == value]
        if len(places) > 1 and len({self.plan.calls[k][0] for k in places}) > 1:
            return places[1]
        return places[0]

    def _view_index(self, timestep: Any) -> int | None:
        """The position of ``timestep`` in ``self.timesteps`` when it is a one-element view of that tensor."""
        ts = self.timesteps
        if not (isinstance(timestep, torch.Tensor) and isinstance(ts, torch.Tensor)) or timestep.numel() != 1:
            return None
        if (timestep.device != ts.device or timestep.device.type == "meta" or timestep.dtype != ts.dtype
                or ts.ndim != 1 or ts.stride(0) != 1
                or timestep.untyped_storage().data_ptr() != ts.untyped_storage().data_ptr()):
            return None
        k = timestep.storage_offset() - ts.storage_offset()
        return k if 0 <= k < ts.numel() else None

    def convert_model_output(
        self, model_output: torch.Tensor, sample: torch.Tensor, step_index: int, *, clip: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(x0, eps)`` pair of a raw model output at model call ``step_index`` (its grid point), with ``x0``
        clipped as ``clip_sample`` says; ``clip=False``: unclipped, for guidance, which combines the branches first
        and clips once after (``step_pair`` does), as diffusers clips the x0 of ``u + w (c - u)``."""
        if self.plan is None:
            raise ValueError("call `set_timesteps` before `convert_model_output`")
        if not (type(step_index) is int and 0 <= step_index < self.plan.nfe):  # the common case, without a call
            if (isinstance(step_index, torch.Tensor) and step_index.device.type == "cpu" and step_index.ndim == 0
                    and not step_index.is_floating_point() and step_index.dtype != torch.bool):
                step_index = int(step_index)  # an integer CPU tensor, as guided_step's `index` takes (no sync)
            check_int("step_index", step_index, 0, self.plan.nfe - 1, what="the model call's index")
        grid = self.plan.grid
        i = self.plan.calls[step_index][0]
        x0, eps = to_pair(model_output, sample, float(grid.alphas[i]), float(grid.sigmas[i]), self.prediction_type)
        return self._postprocess_pair(x0, eps) if clip else (x0, eps)

    def _state_flow_for_diffusers(self) -> None:
        """On a flow config, state the flow settings as diffusers' UniPC/DPM-Solver read them (``use_flow_sigmas``,
        ``flow_shift``), where this class has those options: a config holding a FlowMatch ``shift`` only would make
        them combine VP sigmas with flow prediction (thousands off, silently). fewstep itself reads ``shift`` first,
        so its own results do not change. Not on FlowMatch-Euler-style grids (``ddim``; ``dc-solver`` on ``ddim``):
        diffusers' Flux pipeline drops its ``sigmas = linspace(1, 1/N, N)`` for a scheduler whose config says
        ``use_flow_sigmas``, and such a grid would then not be FlowMatchEuler's."""
        cfg = self.config
        if self._declares("use_flow_sigmas") and not cfg.use_flow_sigmas and self.flow_grid_style != "flowmatch":
            self.register_to_config(use_flow_sigmas=True)
        shift = cfg.get("shift")
        if self._declares("flow_shift") and shift is not None and cfg.flow_shift != shift:
            self.register_to_config(flow_shift=float(shift))

    def _check_clip_sample(self) -> None:
        """Validate ``clip_sample_range`` where it applies (see ``clip_range``)."""
        if self._declares("clip_sample") and self.config.clip_sample:
            check_number("clip_sample_range", self.config.clip_sample_range, 0.0, low_open=True)

    def clip_range(self) -> float | None:
        """The ``r`` of diffusers' ``clip_sample`` (``x0`` clamped to ``[-r, r]``, DDIM-style), or ``None``.

        Only schedulers that declare ``clip_sample`` (``ddim``, ``dc-solver``, ``flow-euler``, ``flowchef``) clip;
        on every other one the key is ignored as diffusers' UniPC/DPM-Solver ignore it -- it reaches their config
        whenever they are built from a DDPM/DDIM config, whose ``clip_sample`` defaults to True."""
        if not self._declares("clip_sample") or not self.config.clip_sample:
            return None
        return float(self.config.clip_sample_range)

    def _postprocess_pair(self, x0: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.clip_range()
        if r is not None:
            x0 = x0.clamp(-r, r)
        return x0, eps

    def _begin_step(self, timestep: Any) -> int:
        if self.plan is None or self._state is None:
            raise ValueError("call `set_timesteps` before `step`")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= self.plan.nfe:
            raise ValueError(
                f"all {self.plan.nfe} steps have run; call `set_timesteps` again to sample another batch"
            )
        return i

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> FewstepSchedulerOutput | tuple[torch.Tensor, ...]:
        """Advance ``sample`` from the current grid point to the next one.

        ``model_output`` must have the sample's shape (a learned-variance model's ``2C`` channels: pass the first
        ``C``). Half-precision inputs are computed in float32 and returned in their own dtype.
        """
        dtype = _step_dtype(model_output=model_output, sample=sample)
        _check_output_shape(sample, model_output=model_output)
        i = self._begin_step(timestep)
        x = self.model_sample(i, self.working_sample(sample, dtype))
        x0, eps = self.convert_model_output(model_output.to(dtype), x, i)
        return self._advance(i, x, x0, eps, sample.dtype, return_dict, self._step_noise(i, x, generator))

    def step_pair(
        self,
        x0: torch.Tensor,
        eps: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
        history: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> FewstepSchedulerOutput | tuple[torch.Tensor, ...]:
        """Like ``step`` but takes the ``(x0, eps)`` pair directly: guidance rules such as CFG++ hand the
        solver an inconsistent pair (guided ``x0``, unconditional ``eps``) through this entry point.

        ``history``: the ``(x0, eps)`` pair that later steps read for this evaluation in their derivative terms
        (default: the same pair). CFG++'s ``history="unconditional"`` passes the unconditional pair here, as the
        official multistep CFG++ samplers keep the unconditional ``x0`` of earlier steps. Not with step hooks
        (``dc-solver``, ``flowchef``), which rewrite the buffered pair."""
        dtype = _step_dtype(x0=x0, eps=eps, sample=sample)
        _check_output_shape(sample, x0=x0, eps=eps)
        if history is not None:
            if not (isinstance(history, (tuple, list)) and len(history) == 2):
                raise ValueError("`history` must be an (x0, eps) pair of tensors or None, got "
                                 f"{type(history).__name__}")
            _step_dtype(history_x0=history[0], history_eps=history[1], sample=sample)
            _check_output_shape(sample, history_x0=history[0], history_eps=history[1])
            if self._state is not None and self._state.hooks:
                raise ValueError(f"`history` cannot be used with {type(self).__name__}: its step hooks "
                                 f"({', '.join(type(h).__name__ for h in self._state.hooks)}) rewrite the buffered "
                                 "pair; use a sampler without hooks (ddim, dpm-solver++, unipc, dpm-solver-v3, s3)")
        i = self._begin_step(timestep)
        x = self.model_sample(i, self.working_sample(sample, dtype))
        x0, eps = self._postprocess_pair(x0.to(dtype), eps.to(dtype))
        if history is not None:
            history = self._postprocess_pair(history[0].to(dtype), history[1].to(dtype))
        return self._advance(i, x, x0, eps, sample.dtype, return_dict, self._step_noise(i, x, generator), history)

    def _step_noise(
        self, k: int, x: torch.Tensor, generator: torch.Generator | None, given: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Fresh standard normal noise for model call ``k`` when its step's predictor is stochastic (SDE), drawn
        from ``generator`` (or ``given``: the caller's ``variance_noise``, used as it is); ``None`` for ODE steps and
        for the first call of a step with an implicit corrector.

        Drawn in float32 on every stochastic step (also a final one whose noise weight is 0), as diffusers does,
        so that one seeded generator gives the same trajectory with either library."""
        i, again = self.plan.calls[k]
        if not self.plan.decisions[i].stochastic or (self.plan.steps[i].reevaluate and not again):
            return None
        if given is not None:
            return given.to(device=x.device, dtype=x.dtype)
        return randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)

    def working_sample(self, sample: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``sample`` in the compute ``dtype``. A half-precision sample that this scheduler returned at the previous
        step keeps the precision it was computed in: the elements the caller left as returned (equal after rounding)
        are taken from the float32 result, so increments below half a float16/bfloat16 ULP are not rounded away at
        every step (1000 DDIM steps in float16 drifted 0.12 RMS from the float64 solve on data of std 1.3, 3x
        diffusers' DDIM; now as far as the correctors' float32 state: 5e-4). Changed elements (an inpainting blend,
        a callback) are the caller's. Elementwise on the device: no host sync. ``dtype``: default the compute dtype
        of ``sample``'s (float32 for half precision); what ``step`` integrates and converts model outputs with."""
        dtype = compute_dtype(sample.dtype) if dtype is None else dtype
        x = sample.to(dtype)
        kept = getattr(self, "_kept_sample", None)
        if kept is None or sample.dtype == dtype or kept[0] is not self._state:
            return x
        full = kept[1]  # (stored detached: it must not carry the previous step's graph past the caller's detach)
        if full.shape != sample.shape or full.device != sample.device or full.dtype != dtype:
            return x
        return resume_precision(sample, full)

    def _keep_precision(self, i: int, full: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Step ``i``'s result ``full`` in ``out_dtype``; a half-precision step keeps ``full`` for `working_sample`
        at the next one (none after the last step: the scheduler would hold a latent-sized tensor until the next
        run)."""
        prev = full.to(out_dtype)
        self._kept_sample = ((self._state, full.detach()) if prev.dtype != full.dtype and i + 1 < self.plan.nfe
                             else None)  # fmt: skip
        return prev

    def _advance(self, i, x, x0, eps, out_dtype, return_dict, noise=None, history=None):
        full = self._state.call(i, x, x0, eps, noise, history)
        prev = self._keep_precision(i, full, out_dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev, x0.to(out_dtype)) if self.tuple_with_x0 else (prev,)
        return FewstepSchedulerOutput(prev_sample=prev, pred_original_sample=x0.to(out_dtype))

    # ----------------------------------------------------------------------------------------------
    # forward process
    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """``alpha_t x0 + sigma_t eps`` at model timesteps ``timesteps`` (one per batch element or a scalar).

        A timestep of the current grid gets that grid point's exact ``alpha``/``sigma`` (as diffusers takes
        ``self.sigmas[step_index]``): on a Karras grid the model timesteps are rounded while the solver starts
        from the exact level, so img2img's noised start must use the latter. ``original_samples`` and ``noise`` must
        be floating tensors (an integer image would be noised in its own dtype, truncating ``alpha``/``sigma``)."""
        return self._forward_process(original_samples, noise, timesteps,
                                     ("original_samples", "noise", "timesteps"))  # fmt: skip

    def _forward_process(self, x0: Any, noise: Any, timesteps: Any, names: tuple[str, str, str]) -> torch.Tensor:
        """``add_noise`` / ``scale_noise``: the checks name the caller's arguments (``names``: sample, noise, times)."""
        a, s = self._alpha_sigma_at(x0, noise, timesteps, names)
        return a * x0 + s * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``alpha_t noise - sigma_t sample`` (Salimans & Ho 2022), as diffusers'
        ``get_velocity`` (what v-prediction training loops call), at model timesteps ``timesteps`` (one per sample,
        or one). VP schedules only: a flow-matching model's velocity target is ``noise - sample``."""
        if self.is_flow:
            raise ValueError(f"`get_velocity` is the v-prediction target of VP (diffusion) schedules; "
                             f"{type(self).__name__} is on a flow-matching schedule here, whose velocity target is "
                             "noise - sample")  # fmt: skip
        # the training target at the timestep's own level, never a sampling grid's exact one (a Karras grid's
        # rounded timesteps would otherwise move it)
        a, s = self._alpha_sigma_at(sample, noise, timesteps, ("sample", "noise", "timesteps"), grid_levels=False)
        return a * noise - s * sample

    def _alpha_sigma_at(self, x0: Any, noise: Any, timesteps: Any, names: tuple[str, str, str],
                        grid_levels: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha``, ``sigma`` at ``timesteps``, shaped ``(-1, 1, ...)`` over ``x0``'s dimensions as diffusers
        shapes them, after checking the three arguments (``names``: how the caller calls them): they must broadcast
        together (as in diffusers, e.g. one image and a batch of noise). ``grid_levels``: a timestep of the current
        grid gets that grid point's exact level (img2img's noised start; see ``add_noise``)."""
        x_name, noise_name, t_name = names
        _check_floating(**{x_name: x0, noise_name: noise})
        if x0.ndim == 0:
            raise ValueError(f"`{x_name}` must be a batch of samples (batch first), got a 0-d tensor")
        if not isinstance(timesteps, (torch.Tensor, np.ndarray, list, tuple, int, float, np.integer, np.floating)) \
                or isinstance(timesteps, bool):
            raise ValueError(f"`{t_name}` must be a tensor of model timesteps (one per sample, or one), got "
                             f"{type(timesteps).__name__}")  # fmt: skip
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.detach()  # a tensor that requires grad cannot be read back into numpy
        t = torch.as_tensor(timesteps).to(torch.float64).reshape(-1).cpu().numpy()
        shape = (-1,) + (1,) * (x0.ndim - 1)
        level_shape = (t.size,) + (1,) * (x0.ndim - 1)
        try:
            ok = t.size > 0 and bool(torch.broadcast_shapes(level_shape, tuple(x0.shape), tuple(noise.shape)))
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"`{t_name}` ({t.size} timesteps), `{x_name}` {tuple(x0.shape)} and `{noise_name}` "
                             f"{tuple(noise.shape)} do not broadcast together: give one model timestep or one per "
                             "sample, and noise of the samples' shape")  # fmt: skip
        sched = self.noise_schedule
        grid_values = set(self._timestep_values or ())
        outside = [v for v in t.tolist() if not (sched.t_min <= v <= sched.t_max) and v not in grid_values]
        if outside:
            raise ValueError(f"`{t_name}` must lie in [{sched.t_min:g}, {sched.t_max:g}] (model times of this "
                             f"{sched.kind} schedule), got {outside[:8]}")  # fmt: skip
        alpha, sigma = (np.array(v, dtype=np.float64, ndmin=1) for v in sched.alpha_sigma(t))
        if grid_levels and self.plan is not None and self._timestep_values:
            # a repeated timestep (rounded Karras grids) is the current call's (diffusers: step_index, else
            # begin_index: img2img's noised start), else diffusers' index_for_timestep's
            current = self._step_index if self._step_index is not None else self._begin_index
            grid, listed = self.plan.grid, set(self._timestep_values)
            for j, value in enumerate(t.tolist()):
                if value in listed:
                    i = self.plan.calls[self._index_of_value(value, current)][0]
                    alpha[j], sigma[j] = grid.alphas[i], grid.sigmas[i]
        a = torch.as_tensor(alpha, dtype=x0.dtype, device=x0.device).reshape(shape)
        s = torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device).reshape(shape)
        return a, s

    def scale_noise(
        self, sample: torch.Tensor, timestep: torch.Tensor | float, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Flow models' forward process, as diffusers' ``FlowMatchEulerDiscreteScheduler.scale_noise`` (what the SD3
        and Flux img2img/inpaint pipelines call): ``(1 - s) x0 + s eps`` with ``s = t / T`` at model timestep
        ``timestep``."""
        if not self.is_flow:
            raise ValueError(
                f"`scale_noise` is the forward process of flow-matching models; {type(self).__name__} is on a VP "
                "schedule here: use add_noise"
            )
        if noise is None:
            raise ValueError("`noise` must be a tensor of the sample's shape, got None")
        return self._forward_process(sample, noise, timestep, ("sample", "noise", "timestep"))
