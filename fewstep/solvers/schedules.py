"""Noise schedules: the map from a model's time variable to ``alpha_t``, ``sigma_t`` and ``lambda_t``.

Every schedule here describes a forward process ``x_t = alpha_t x0 + sigma_t eps`` and offers

* ``alpha_sigma(t)`` -- ``(alpha_t, sigma_t)`` for model timesteps ``t`` (float64 numpy),
* ``lambda_(t)`` -- the half log-SNR ``lambda_t = log(alpha_t / sigma_t)``,
* ``t_of_lambda(lam)`` -- the exact inverse of ``lambda_``,
* ``t_of_rho(rho)`` -- the inverse in terms of ``rho = sigma / alpha`` (the "VP sigma" of diffusers).

All of it runs on the host in float64; solvers precompute their coefficients from it once per
``set_timesteps``. Nothing in this module imports diffusers: configs are plain mappings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._checks import check_int, check_number

__all__ = [
    "BETA_SCHEDULES",
    "NoiseSchedule",
    "VPSchedule",
    "FlowSchedule",
    "schedule_from_config",
    "is_flow_config",
    "make_betas",
    "ZERO_SNR_ALPHA_BAR",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
#: diffusers' stand-in for the final alpha_bar = 0 of ``rescale_betas_zero_snr`` (Lin et al. 2024, sec. 3.1): the
#: smallest float16 subnormal, 2^-24 (rho = sigma/alpha = 4096).
ZERO_SNR_ALPHA_BAR = 2.0**-24


def _as_array(t: Any) -> np.ndarray:
    return np.asarray(t, dtype=np.float64)


class NoiseSchedule:
    """Base class: subclasses implement ``alpha_sigma`` and ``t_of_lambda``."""

    num_train_timesteps: int
    kind: str = "abstract"

    def alpha_sigma(self, t: Any) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def t_of_lambda(self, lam: Any) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def lambda_(self, t: Any) -> np.ndarray:
        """``lambda_t = log(alpha_t) - log(sigma_t)`` (``+inf`` where ``sigma_t = 0``)."""
        alpha, sigma = self.alpha_sigma(t)
        with np.errstate(divide="ignore"):
            return np.log(alpha) - np.log(sigma)

    def rho(self, t: Any) -> np.ndarray:
        """``rho_t = sigma_t / alpha_t``: the noise level of ``x_t / alpha_t``."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def t_of_rho(self, rho: Any) -> np.ndarray:
        """Model time whose ``sigma/alpha`` equals ``rho`` (``rho > 0``)."""
        rho = _as_array(rho)
        if np.any(~np.isfinite(rho)) or np.any(rho <= 0):
            raise ValueError(f"`rho` must be finite and > 0, got {rho!r}")
        return self.t_of_lambda(-np.log(rho))

    @property
    def t_max(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def t_min(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError


def _betas_for_alpha_bar(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule of Nichol & Dhariwal (2021), eq. 17: ``alpha_bar(t) = cos^2((t + 0.008)/1.008 * pi/2)``."""

    def alpha_bar(x: float) -> float:
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.asarray(betas, dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale ``sqrt(alpha_bar)`` so the last step has zero SNR.

    Done in float32 torch with diffusers' exact order of operations, so the result matches bit for bit.
    """
    import torch

    alphas_bar_sqrt = torch.cumprod(1.0 - torch.from_numpy(betas.astype(np.float32)), dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).numpy().astype(np.float32)


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Any = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """The discrete betas of a diffusers VP config, built in float32 exactly as diffusers builds them.

    Matching diffusers bit for bit matters: the model was trained on these alphas. ``trained_betas`` must hold
    exactly ``num_train_timesteps`` values (a ``ValueError`` names both otherwise).
    """
    check_int("num_train_timesteps", num_train_timesteps, 2)
    if trained_betas is None and beta_schedule in ("linear", "scaled_linear"):
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):  # before torch sees a string
            check_number(name, value, 0.0, 1.0, low_open=True, allowed="(0, 1)")
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32).reshape(-1)
        if betas.size < 2 or np.any(~np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
            raise ValueError("`trained_betas` must hold at least 2 finite values in (0, 1)")
        if betas.size != num_train_timesteps:
            # the schedule would have len(trained_betas) steps while the config (which pipelines read, e.g. SDXL's
            # denoising_end, and diffusers' own schedulers index with) says num_train_timesteps
            raise ValueError(f"`trained_betas` holds {betas.size} values but `num_train_timesteps` is "
                             f"{num_train_timesteps}: they must agree (one beta per training step); pass "
                             f"num_train_timesteps={betas.size} with these betas")
    elif beta_schedule == "linear":
        betas = _float32_linspace(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = _float32_linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(num_train_timesteps)
    else:
        raise ValueError(
            f"`beta_schedule` must be one of {list(BETA_SCHEDULES)} (or pass `trained_betas`), got {beta_schedule!r}"
        )
    if trained_betas is None and beta_schedule != "squaredcos_cap_v2":
        if not (0 < beta_start < 1 and 0 < beta_end < 1):
            raise ValueError(f"`beta_start`/`beta_end` must lie in (0, 1), got {beta_start!r}, {beta_end!r}")
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _check_alphas_cumprod_range(ac: np.ndarray, betas: np.ndarray, config: Mapping[str, Any]) -> None:
    """A beta schedule whose ``alpha_bar`` (float32, as diffusers computes it) reaches 1 or 0 has a training step
    of infinite log-SNR; refused naming the settings (the generic check of ``VPSchedule`` names none)."""
    trained = config.get("trained_betas") is not None
    settings = "`trained_betas`" if trained else ", ".join(
        f"{key}={config.get(key, default)!r}"
        for key, default in (("beta_schedule", "linear"), ("beta_start", 0.0001), ("beta_end", 0.02)))
    if ac[0] >= 1.0:
        fix = "larger first betas" if trained else "a larger `beta_start`"
        raise ValueError(f"the noise schedule ({settings}) has alpha_bar = 1.0 at training step 0: its first beta "
                         f"{float(betas[0]):.3g} is below float32's resolution (2^-24, diffusers computes alpha_bar in "
                         f"float32), so that step has no noise and an infinite log-SNR; use {fix} (>= 6e-8)")
    if np.any(ac <= 0.0):
        k = int(np.flatnonzero(ac <= 0.0)[0])
        raise ValueError(f"the noise schedule ({settings}) has alpha_bar = 0 (float32 underflow) from training step "
                         f"{k} of {ac.size}: no data is left there (diffusers' samplers return NaN on it); use "
                         f"{'smaller betas' if trained else 'a smaller `beta_end`, fewer `num_train_timesteps`'}"
                         + ("" if config.get("rescale_betas_zero_snr", False) else
                            ", or rescale_betas_zero_snr=True, which stands in 2^-24 for the final alpha_bar"))


def _float32_linspace(start: float, end: float, n: int) -> np.ndarray:
    # torch.linspace(dtype=float32) is what diffusers uses; reproduce its values without importing torch here.
    import torch

    return torch.linspace(start, end, n, dtype=torch.float32).numpy().astype(np.float32)


class VPSchedule(NoiseSchedule):
    """Discrete-time variance-preserving schedule made continuous in t.

    ``alpha_t^2 = prod_{s<=t} (1 - beta_s)`` at the integer training steps ``t = 0..T-1``; between them
    ``log alpha_t`` is interpolated linearly (DPM-Solver's ``NoiseScheduleVP('discrete')``), so the schedule
    is exact at the training steps and continuous in between. ``sigma_t = sqrt(1 - alpha_t^2)``.
    Model time ``t`` is the diffusers timestep (0 = least noise, T-1 = most).
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: Any):
        ac = np.asarray(alphas_cumprod, dtype=np.float64).reshape(-1)
        if ac.size < 2 or np.any(~np.isfinite(ac)) or np.any(ac <= 0) or np.any(ac >= 1):
            raise ValueError("`alphas_cumprod` must hold at least 2 finite values in (0, 1)")
        if np.any(np.diff(ac) >= 0):
            raise ValueError("`alphas_cumprod` must be strictly decreasing")
        self.alphas_cumprod = ac
        self.num_train_timesteps = int(ac.size)
        self.log_alphas = 0.5 * np.log(ac)
        self._grid = np.arange(ac.size, dtype=np.float64)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VPSchedule:
        """Build from a diffusers scheduler config (DDPM/DDIM/PNDM/Euler/DPM/UniPC style)."""
        if is_flow_config(config):
            raise ValueError(
                "a flow-matching config was given to a VP schedule (it sets "
                f"{_flow_markers(config)}); use FlowSchedule or `schedule_from_config`"
            )
        betas = make_betas(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_start=config.get("beta_start", 0.0001),
            beta_end=config.get("beta_end", 0.02),
            beta_schedule=config.get("beta_schedule", "linear"),
            trained_betas=config.get("trained_betas"),
            rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)),
        )
        import torch  # float32 cumprod exactly as diffusers computes it

        ac = torch.cumprod(1.0 - torch.from_numpy(betas.astype(np.float32)), dim=0).numpy().astype(np.float64)
        if config.get("rescale_betas_zero_snr", False):
            # diffusers' stand-in for alpha_bar = 0 (2^-24, the smallest float16 subnormal); only where that would
            # not lie below its neighbour (linear betas: alpha_bar[-2] = 4.2e-9) half the neighbour instead, so the
            # schedule stays strictly decreasing
            tiny = ZERO_SNR_ALPHA_BAR
            ac[-1] = tiny if tiny < ac[-2] else ac[-2] / 2
        _check_alphas_cumprod_range(ac, betas, config)
        return cls(ac)

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    @property
    def t_min(self) -> float:
        return 0.0

    def log_alpha(self, t: Any) -> np.ndarray:
        t = _as_array(t)
        if np.any(~np.isfinite(t)):
            raise ValueError(f"timesteps must be finite, got {t!r}")
        # np.interp clamps outside [0, T-1]; extrapolate linearly instead so t in (-1, 0) is meaningful.
        out = np.interp(t, self._grid, self.log_alphas)
        lo, hi = t < 0, t > self.t_max
        if np.any(lo):
            slope = self.log_alphas[1] - self.log_alphas[0]
            out = np.where(lo, self.log_alphas[0] + slope * t, out)
        if np.any(hi):
            slope = self.log_alphas[-1] - self.log_alphas[-2]
            out = np.where(hi, self.log_alphas[-1] + slope * (t - self.t_max), out)
        return out

    def alpha_sigma(self, t: Any) -> tuple[np.ndarray, np.ndarray]:
        log_alpha = self.log_alpha(t)
        alpha = np.exp(log_alpha)
        sigma = np.sqrt(-np.expm1(2.0 * log_alpha))
        return alpha, sigma

    def t_of_lambda(self, lam: Any) -> np.ndarray:
        """Inverse of ``lambda_t``: ``log alpha = -softplus(-2 lambda)/2``, then invert the interpolation."""
        lam = _as_array(lam)
        if np.any(np.isnan(lam)):
            raise ValueError(f"`lambda` must not be NaN, got {lam!r}")
        log_alpha = -0.5 * np.logaddexp(0.0, -2.0 * lam)
        # log_alphas is decreasing in t: interpolate on the reversed arrays.
        return np.interp(log_alpha, self.log_alphas[::-1], self._grid[::-1])

    def discrete_rho(self) -> np.ndarray:
        """``sqrt((1 - alpha_bar)/alpha_bar)`` at the training steps: diffusers' ``sigmas`` before set_timesteps."""
        return np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)


@dataclass(frozen=True)
class FlowShift:
    """Static ``shift`` or dynamic ``mu`` of diffusers' FlowMatchEulerDiscreteScheduler."""

    shift: float = 1.0

    def __post_init__(self) -> None:
        check_number("shift", self.shift, 0.0, low_open=True)

    @staticmethod
    def from_mu(mu: float) -> FlowShift:
        """Exponential time shift of SD3/Flux: ``s' = e^mu s / (e^mu s + 1 - s)``, i.e. ``shift = e^mu``."""
        if not math.isfinite(mu) or not -700.0 < mu < 700.0:  # exp(mu) must be a positive finite float64
            raise ValueError(f"`mu` (the log of the dynamic shift) must be a finite number in (-700, 700), got {mu!r}")
        return FlowShift(math.exp(mu))

    def apply(self, s: np.ndarray) -> np.ndarray:
        """``shift * s / (1 + (shift - 1) * s)`` (Esser et al. 2024, eq. 23)."""
        return self.shift * s / (1.0 + (self.shift - 1.0) * s)


class FlowSchedule(NoiseSchedule):
    """Rectified flow ``x_s = (1 - s) x0 + s eps`` for ``s`` in [0, 1]; model time ``t = s * T``.

    ``alpha = 1 - s``, ``sigma = s``, ``lambda = log((1 - s)/s)``. Shifting acts on the grid of ``s``
    (see ``FlowShift``), not on this map, exactly as in diffusers.
    """

    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowSchedule:
        return cls(config.get("num_train_timesteps", 1000))

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps)

    @property
    def t_min(self) -> float:
        return 0.0

    def alpha_sigma(self, t: Any) -> tuple[np.ndarray, np.ndarray]:
        t = _as_array(t)
        if np.any(~np.isfinite(t)):
            raise ValueError(f"timesteps must be finite, got {t!r}")
        s = t / self.num_train_timesteps
        return 1.0 - s, s

    def t_of_lambda(self, lam: Any) -> np.ndarray:
        lam = _as_array(lam)
        if np.any(np.isnan(lam)):
            raise ValueError(f"`lambda` must not be NaN, got {lam!r}")
        # s = 1 / (1 + e^lambda), written stably for both signs.
        return self.num_train_timesteps * np.exp(-np.logaddexp(0.0, lam))


_FLOW_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "invert_sigmas", "shift_terminal")


def _flow_markers(config: Mapping[str, Any]) -> list[str]:
    found = []
    if config.get("_class_name", "").startswith("FlowMatch"):
        found.append(f"_class_name={config['_class_name']!r}")
    if config.get("use_flow_sigmas"):
        found.append("use_flow_sigmas=True")
    if config.get("use_dynamic_shifting"):  # a flow-only option (FlowMatch*, UniPC/DPM-Solver flow sigmas)
        found.append("use_dynamic_shifting=True")
    if config.get("prediction_type") in ("flow", "flow_prediction"):
        found.append(f"prediction_type={config['prediction_type']!r}")
    if config.get("shift") is not None:
        found.append(f"shift={config['shift']!r}")
    return found


def is_flow_config(config: Mapping[str, Any]) -> bool:
    """True for flow-matching configs: FlowMatch* classes (SD3, Flux), ``use_flow_sigmas``, dynamic shifting, a
    ``shift`` or flow prediction."""
    return bool(_flow_markers(config))


def schedule_from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """The schedule a diffusers scheduler config describes: ``FlowSchedule`` or ``VPSchedule``."""
    if is_flow_config(config):
        return FlowSchedule.from_config(config)
    return VPSchedule.from_config(config)


def mean_reverting_alphas_cumprod(num_steps: int = 100, a_end: float = 0.005, offset: float = 0.008) -> np.ndarray:
    """IR-SDE's cosine mean-reverting schedule (Luo et al. 2023), as a VP ``alpha_bar`` over index steps.

    ``dx = theta_t (mu - x) dt + g_t dw`` with ``g_t^2 = 2 lam^2 theta_t`` has the marginal
    ``x_t = a_t x0 + (1 - a_t) mu + s_t eps``, ``a_t = exp(-int theta)``, ``s_t = lam sqrt(1 - a_t^2)``, so
    ``z = (x - mu) / lam`` follows the VP process ``z_t = a_t z_0 + sqrt(1 - a_t^2) eps`` -- every VP solver applies
    to ``z`` (Li et al. 2025, sec. 3). ``theta_i = 1 - abar_cos((i + 1) / (T + 2))`` from the improved-DDPM cosine on
    ``T + 3`` points ``0..T+2`` with both ends dropped (the released IR-SDE / MR-Sampler code), ``a_i =
    exp(-dt sum_{j<=i} theta_j)`` with ``dt`` such that ``a_T = a_end``; returns ``a_i^2`` for ``i = 0..T``.
    """
    check_int("num_steps", num_steps, 2, numpy_ok=False)
    check_number("a_end", a_end, 0.0, 1.0, low_open=True, allowed="(0, 1)")
    if a_end == 1:
        raise ValueError(f"`a_end` must be a finite number in (0, 1), got {a_end!r}")
    check_number("offset", offset, 0.0)
    grid = np.arange(num_steps + 3, dtype=np.float64) / (num_steps + 2)
    abar = np.cos((grid + offset) / (1 + offset) * np.pi / 2) ** 2
    abar = abar / abar[0]
    theta = 1.0 - abar[1:-1]  # num_steps + 1 values at grid points 1..T+1, rising from ~6e-4 to ~0.9998
    dt = -np.log(a_end) / theta.sum()
    a = np.exp(-dt * np.cumsum(theta))
    return a**2
