"""DC-Solver: dynamic compensation on UniPC (or predictor-only on DDIM / DPM-Solver++), on the unified engine."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from diffusers.configuration_utils import register_to_config

from .._checks import check_int
from ..solvers.dc import DC_VARIABLES, DynamicCompensation, check_ratios, compile_dc, compile_dc_plan
from ..solvers.dc_artifacts import CPRModel, load_cpr, load_ratios
from ..solvers.engine import EngineState
from ..solvers.methods import DPM_SOLVER_TYPES, UNIPC_TYPES, ddim_decisions, dpm_solver_decisions, unipc_decisions
from ..solvers.parameterization import normalize_prediction_type
from ..solvers.schedules import is_flow_config
from .base import FewstepScheduler, SchedulerMixin  # noqa: F401 - SchedulerMixin: see base.py
from .dpm_solver import ODE_ALGORITHMS, check_ode_algorithm_type
from .unipc import check_unipc_noise_form

__all__ = ["FewstepDCSolverScheduler", "DC_BASES", "SHIPPED_DC_ARTIFACTS", "dc_scheduler_key", "shipped_artifact"]

DC_BASES = ("unipc", "ddim", "dpm-solver++")
_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "dc-solver"
#: artifacts that ship with fewstep, usable by name in ``dc_ratios_file`` / ``dc_cpr``.
SHIPPED_DC_ARTIFACTS = {
    "digits-eps": {"ratios": _ASSETS / "digits-eps.ratios.safetensors", "cpr": _ASSETS / "digits-eps.cpr.safetensors"},
}
#: config fields the searched ratios depend on (noise schedule, time grid, base solver, DC settings).
_KEY_FIELDS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "rescale_betas_zero_snr",
    "timestep_spacing",
    "steps_offset",
    "final_sigmas_type",
    "time_grid",
    "use_karras_sigmas",
    "dc_base",
    "solver_order",
    "solver_type",
    "predict_x0",
    "lower_order_final",
    "disable_corrector",
    "dc_order",
    "dc_variable",
)


#: DPM-Solver options of the ``dpm-solver++`` base: part of the key (with that base only) when they differ from these
#: defaults, so that tables made before they were honoured (all with the defaults) keep their key.
_DPM_KEY_DEFAULTS = {"algorithm_type": "dpmsolver++", "euler_at_final": False}


#: a flow config's settings that place its time grid (part of the key of a flow model's artifacts)
_FLOW_KEY_FIELDS = ("shift", "flow_shift", "use_flow_sigmas", "use_dynamic_shifting", "base_shift", "max_shift",
                    "base_image_seq_len", "max_image_seq_len", "shift_terminal")


def dc_scheduler_key(config: Any) -> dict:
    """The scheduler settings a ratio table or CPR fit is valid for (stored in, and checked against, artifacts).

    What the model is (its prediction type, ``trained_betas``, a flow process and its shift) enters the key only when
    it is not the default (epsilon, parametric betas, VP), so that keys of tables made before it was part of the key
    (all with those defaults) still match."""
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    key = {k: get(k, None) for k in _KEY_FIELDS}
    if key["disable_corrector"] is not None:
        key["disable_corrector"] = sorted(int(v) for v in key["disable_corrector"])
    for k, default in _DPM_KEY_DEFAULTS.items():
        if key["dc_base"] == "dpm-solver++" and get(k, default) != default:
            key[k] = get(k, default)
    flow = is_flow_config({k: get(k, None) for k in ("_class_name", *_FLOW_KEY_FIELDS, "prediction_type")
                           if get(k, None) is not None})
    prediction = normalize_prediction_type(get("prediction_type", None) or "epsilon")
    if flow:
        prediction = "flow" if prediction == "epsilon" else prediction  # as the scheduler reads a flow config
        key["flow"] = {k: get(k, None) for k in _FLOW_KEY_FIELDS}
    if prediction != "epsilon":
        key["prediction_type"] = prediction
    betas = get("trained_betas", None)
    if betas is not None:
        import hashlib

        values = np.round(np.asarray(betas, dtype=np.float64), 12)
        key["trained_betas"] = f"sha256:{hashlib.sha256(values.tobytes()).hexdigest()[:16]}"
    return key


def shipped_artifact(name: str, kind: str) -> Path:
    """Path of a shipped DC artifact: ``kind`` is ``"ratios"`` or ``"cpr"``, ``name`` e.g. ``"digits-eps"``."""
    if name not in SHIPPED_DC_ARTIFACTS:
        raise ValueError(f"no shipped DC-Solver artifacts for {name!r}; available: {', '.join(SHIPPED_DC_ARTIFACTS)}")
    if kind not in ("ratios", "cpr"):
        raise ValueError(f"`kind` must be 'ratios' or 'cpr', got {kind!r}")
    return SHIPPED_DC_ARTIFACTS[name][kind]


def _resolve(value: str, kind: str) -> Path:
    return shipped_artifact(value, kind) if value in SHIPPED_DC_ARTIFACTS else Path(value)


class FewstepDCSolverScheduler(FewstepScheduler):
    """DC-Solver: UniPC with dynamic compensation of the buffered output (ratios, ratio file or CPR).

    Zhao, Wang, Zhou & Lu (ECCV 2024), sec. 3.2-3.4. Before the predictor of step ``i`` the newest buffered
    output is replaced by a Lagrange interpolation of the last ``dc_order + 1`` outputs at
    ``tau_i = v_{i-1} + rho_i (v_i - v_{i-1})`` in ``dc_variable`` (``t``, ``lambda`` or ``sigma``); see
    ``fewstep.solvers.dc``. ``dc_base`` picks the solver: ``unipc`` (predictor-corrector, the paper's main
    setting) or the predictor-only plug-in for ``ddim`` / ``dpm-solver++``. With all ratios 1 it is exactly
    its base solver on the same config (built from defaults, ``dc_base="ddim"`` differs from ``ddim``'s own
    defaults: diffusers' DDIM clips ``x0`` and uses ``leading`` spacing; build both from one config). The base's
    own options are honoured: ``solver_order``, ``solver_type``, ``lower_order_final`` for both multistep bases,
    ``predict_x0`` and ``disable_corrector`` for ``unipc`` (``predict_x0=False``: noise form, also for ``ddim``),
    ``algorithm_type`` (``"dpmsolver++"`` data / ``"dpmsolver"`` noise prediction) and ``euler_at_final`` for
    ``dpm-solver++``. Refused, naming the key: the SDE ``algorithm_type``s (the compensation interpolates the
    outputs along a deterministic trajectory, sec. 3.2) and ``predict_x0=False`` with ``dc_base="dpm-solver++"``
    (that base's form is its ``algorithm_type``).

    The ratios come from exactly one of:

    * ``dc_ratios``: one float per step (the first ``dc_order`` must be 1);
    * ``dc_ratios_file``: a ratio table from ``fewstep calibrate dc`` (or ``"digits-eps"`` for the shipped
      one); needs ``dc_model`` and ``dc_guidance_scale``, and must match them, the NFE and the scheduler;
    * ``dc_cpr``: CPR coefficients (36 floats) or a CPR file (or ``"digits-eps"``); needs
      ``dc_guidance_scale``; a file also needs and checks ``dc_model`` and warns outside its fitted range.

    With none, all ratios are 1 (the base solver) and a warning says so (once per scheduler).
    """

    _artifact_config_keys = {"dc_ratios_file": SHIPPED_DC_ARTIFACTS, "dc_cpr": SHIPPED_DC_ARTIFACTS}

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006 - diffusers' config default, never mutated
        use_karras_sigmas: bool = False,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        rescale_betas_zero_snr: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        time_grid: str = "spacing",
        shift: float | None = None,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        dc_base: Literal["unipc", "ddim", "dpm-solver++"] = "unipc",
        dc_order: int = 2,
        dc_variable: Literal["t", "lambda", "sigma"] = "t",
        dc_ratios: list[float] | None = None,
        dc_ratios_file: str | None = None,
        dc_cpr: list[float] | str | None = None,
        dc_model: str | None = None,
        dc_guidance_scale: float | None = None,
        algorithm_type: Literal["dpmsolver++", "dpmsolver"] = "dpmsolver++",
        euler_at_final: bool = False,
    ):
        if dc_base not in DC_BASES:
            raise ValueError(f"`dc_base` must be one of {list(DC_BASES)}, got {dc_base!r}")
        check_ode_algorithm_type(self, algorithm_type, "dc_base",
                                 "DC-Solver compensates the outputs along a deterministic (ODE) trajectory and has "
                                 "no SDE variant")
        if dc_base == "dpm-solver++" and not predict_x0:
            raise ValueError("`predict_x0`=False is UniPC's noise-form switch; with dc_base='dpm-solver++' the form is "
                             "set by algorithm_type: pass algorithm_type='dpmsolver' for noise prediction (allowed "
                             "predict_x0 here: True)")  # fmt: skip
        # diffusers maps the other multistep schedulers' solver_type values (a config copied from one); anything
        # else is an error, as in diffusers
        if dc_base in ("unipc", "dpm-solver++"):
            own, other, default = ((UNIPC_TYPES, DPM_SOLVER_TYPES, "bh2") if dc_base == "unipc"
                                   else (DPM_SOLVER_TYPES, UNIPC_TYPES, "midpoint"))  # fmt: skip
            if solver_type in (*other, "logrho"):
                self.register_to_config(solver_type=default)
            elif solver_type not in own:
                raise ValueError(f"`solver_type` for dc_base={dc_base!r} must be one of {list(own)} (or another "
                                 f"multistep scheduler's {list(other) + ['logrho']}, read as {default!r}), got "
                                 f"{solver_type!r}")  # fmt: skip
        check_int("dc_order", dc_order, 1, 3, numpy_ok=False)
        if dc_variable not in DC_VARIABLES:
            raise ValueError(f"`dc_variable` must be one of {list(DC_VARIABLES)}, got {dc_variable!r}")
        given = [
            name
            for name, v in (("dc_ratios", dc_ratios), ("dc_ratios_file", dc_ratios_file), ("dc_cpr", dc_cpr))
            if v is not None
        ]
        if len(given) > 1:
            raise ValueError(f"pass only one of `dc_ratios`, `dc_ratios_file`, `dc_cpr`; got {given}")
        if dc_guidance_scale is not None and (
            isinstance(dc_guidance_scale, bool)
            or not isinstance(dc_guidance_scale, (int, float))
            or not math.isfinite(dc_guidance_scale)
        ):
            raise ValueError(f"`dc_guidance_scale` must be a finite number, got {dc_guidance_scale!r}")
        shipped = ", ".join(SHIPPED_DC_ARTIFACTS)
        if dc_ratios_file is not None and (
            not isinstance(dc_ratios_file, (str, os.PathLike)) or not str(dc_ratios_file).strip()
        ):
            raise ValueError(f"`dc_ratios_file` must be a ratio table's path (str or os.PathLike) or a shipped name "
                             f"({shipped}), got {dc_ratios_file!r}")
        if dc_cpr is not None:
            if isinstance(dc_cpr, (str, os.PathLike)):
                if not str(dc_cpr).strip():
                    raise ValueError(f"`dc_cpr` must be a CPR file's path, a shipped name ({shipped}) or 36 numbers, "
                                     "got an empty string")
            elif isinstance(dc_cpr, (list, tuple, np.ndarray)):
                bad = [v for v in np.asarray(dc_cpr, dtype=object).reshape(-1)
                       if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating))]
                if bad:
                    raise ValueError(f"`dc_cpr` given as a list must hold 36 real numbers (the CPR coefficients "
                                     f"C[k,p,q]), got {bad[0]!r} among them")
            else:
                raise ValueError(f"`dc_cpr` must be a CPR file's path (str or os.PathLike), a shipped name ({shipped}) "
                                 f"or a list of 36 numbers, got {type(dc_cpr).__name__} {dc_cpr!r}")
        if dc_model is not None and (not isinstance(dc_model, str) or not dc_model.strip()):
            raise ValueError(f"`dc_model` must be a non-empty string naming the model the ratios/CPR file was made for "
                             f"(e.g. 'digits-eps'), got {dc_model!r}")
        if dc_ratios is not None:
            # Validate now what can be checked without the number of steps (list of finite floats).
            check_ratios(dc_ratios, len(dc_ratios) if hasattr(dc_ratios, "__len__") else -1, dc_order,
                         name="dc_ratios")
            self.register_to_config(dc_ratios=[float(r) for r in dc_ratios])
        if (dc_ratios_file is not None or isinstance(dc_cpr, (str, os.PathLike))) and dc_model is None:
            raise ValueError("`dc_model` must name the model the ratios/CPR file was made for (e.g. 'digits-eps')")
        if (dc_ratios_file is not None or dc_cpr is not None) and dc_guidance_scale is None:
            raise ValueError(
                "`dc_guidance_scale` must be given with `dc_ratios_file` or `dc_cpr` (ratios depend on it)"
            )
        self._cpr: CPRModel | None = None
        if dc_cpr is not None:
            if isinstance(dc_cpr, (str, os.PathLike)):
                self._cpr = load_cpr(_resolve(dc_cpr, "cpr"), dc_model, dc_scheduler_key(self.config))
                if self._cpr.order != dc_order:
                    raise ValueError(f"CPR file {dc_cpr!r} was fitted for dc_order {self._cpr.order}, not {dc_order}")
            else:
                self._cpr = CPRModel(list(dc_cpr), order=dc_order)
        if dc_ratios_file is not None and not _resolve(dc_ratios_file, "ratios").is_file():
            raise FileNotFoundError(f"`dc_ratios_file` {dc_ratios_file!r} does not exist")
        self.dc_ratios_used: list[float] | None = None
        self._warned_no_ratios = False
        self._init_common()
        if dc_base == "unipc":
            check_unipc_noise_form(self)
        self._decisions(1, True)
        self._anchor_artifact_files()  # a relative file name: the file read here, from any directory

    @property
    def spacing_style(self) -> str:  # type: ignore[override]
        return "ddim" if self.config.dc_base == "ddim" else "multistep"

    @property
    def flow_grid_style(self) -> str:  # type: ignore[override]
        return {"ddim": "flowmatch", "dpm-solver++": "dpmsolver"}.get(self.config.dc_base, "multistep")

    def _decisions(self, num_steps: int, final_is_clean: bool):
        cfg = self.config
        prediction = "data" if cfg.predict_x0 else "noise"
        if cfg.dc_base == "ddim":
            return ddim_decisions(num_steps, prediction)
        if cfg.dc_base == "dpm-solver++":
            return dpm_solver_decisions(
                num_steps,
                solver_order=cfg.solver_order,
                prediction=ODE_ALGORITHMS[cfg.algorithm_type],
                solver_type=cfg.solver_type,
                lower_order_final=cfg.lower_order_final,
                euler_at_final=cfg.euler_at_final,
                final_is_clean=final_is_clean,
            )
        return unipc_decisions(
            num_steps,
            solver_order=cfg.solver_order,
            prediction=prediction,
            solver_type=cfg.solver_type,
            lower_order_final=cfg.lower_order_final,
            disable_corrector=cfg.disable_corrector or (),
            final_is_clean=final_is_clean,
        )

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, mu=None) -> None:
        """As the base scheduler's; ratios from a file or CPR are refused on custom ``timesteps``/``sigmas``: they
        were searched on the config's own grid (its spacing is part of their key) and would compensate other
        points."""
        cfg = self.config
        if (timesteps is not None or sigmas is not None) and (cfg.dc_ratios_file is not None or self._cpr is not None):
            source = "dc_ratios_file" if cfg.dc_ratios_file is not None else "dc_cpr"
            raise ValueError(f"dc-solver's ratios from `{source}` were searched on the config's own grid; custom "
                             "`timesteps`/`sigmas` would apply them to other points: pass `num_inference_steps`, or "
                             "ratios for this grid as `dc_ratios=[...]`")
        super().set_timesteps(num_inference_steps, device, timesteps, sigmas, mu)

    def ratios_for(self, num_steps: int) -> list[float]:
        """The ratios this scheduler uses for a ``num_steps``-step run (validated; see the class docstring)."""
        cfg = self.config
        if cfg.dc_ratios is not None:
            return check_ratios(cfg.dc_ratios, num_steps, cfg.dc_order, name="dc_ratios")
        if cfg.dc_ratios_file is not None:
            ratios = load_ratios(
                _resolve(cfg.dc_ratios_file, "ratios"),
                cfg.dc_model,
                dc_scheduler_key(cfg),
                num_steps,
                cfg.dc_guidance_scale,
            )
            return check_ratios(ratios, num_steps, cfg.dc_order)
        if self._cpr is not None:
            ratios = self._cpr.predict(num_steps, float(cfg.dc_guidance_scale))
            if min(ratios) <= 0:  # tau at or before the previous point: far outside the fitted range
                raise ValueError(
                    f"CPR predicts ratios <= 0 for NFE {num_steps}, CFG {cfg.dc_guidance_scale:g} (min "
                    f"{min(ratios):.3g}; fitted on NFE {self._cpr.nfe_range}, CFG {self._cpr.guidance_range}): too "
                    "far outside its range; calibrate ratios for this setting (fewstep calibrate dc)"
                )
            return check_ratios(ratios, num_steps, cfg.dc_order)
        if self._warned_no_ratios:
            return [1.0] * num_steps
        self._warned_no_ratios = True
        warnings.warn(
            "dc-solver has no ratios (dc_ratios, dc_ratios_file or dc_cpr): all ratios are 1, i.e. plain "
            f"{cfg.dc_base}",
            UserWarning,
            stacklevel=4,
        )
        return [1.0] * num_steps

    def _install_plan(self, grid, decisions, hooks=(), start=0) -> None:
        """The base solver's plan plus the compensation table (host, float64) and its buffer hook (also when
        ``set_begin_index`` restarts the run part-way)."""
        cfg = self.config
        plan = compile_dc_plan(grid, decisions, cfg.dc_order)
        ratios = self.ratios_for(plan.num_steps)
        table = compile_dc(plan, ratios, cfg.dc_order, cfg.dc_variable, start=start)
        self.plan = plan
        self.dc_ratios_used = ratios
        others = [h for h in hooks if not isinstance(h, DynamicCompensation)]
        self._state = EngineState(plan, [DynamicCompensation(table), *others])
