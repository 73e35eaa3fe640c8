"""Guidance rules on ``(x0, eps)`` pairs: classifier-free guidance, CFG++ and APG.

Notation: ``x_t = alpha x0 + sigma eps``, ``rho = sigma/alpha``; ``(D_c, eps_c)``, ``(D_u, eps_u)`` the
conditional/unconditional pairs at the same ``x_t``; ``Delta = D_c - D_u``. All three rules cost the same
two model evaluations per step (the unconditional pass is never skipped, except plain CFG at scale 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._checks import check_bool, check_number
from .base import GuidanceRule, Pair, StepState

__all__ = [
    "CFG",
    "CFGPlusPlus",
    "APG",
    "apg_update",
    "rescale_to_std",
    "cfgpp_equivalent_scales",
    "scheduler_rhos",
]


def _batch_dims(t: torch.Tensor) -> list[int]:
    return list(range(1, t.ndim))


def check_same_shape(name: str, value: Any, ref_name: str, ref: torch.Tensor,
                     why: str = "batch included; no broadcasting") -> torch.Tensor:
    """``value`` is a tensor of ``ref``'s shape (shapes are metadata: no host sync); returns ``value``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a tensor of `{ref_name}`'s shape {tuple(ref.shape)}, got "
                        f"{type(value).__name__}")
    if value.shape != ref.shape:
        raise ValueError(f"`{name}` must have the shape of `{ref_name}` {tuple(ref.shape)} ({why}), got "
                         f"{tuple(value.shape)}")
    return value


def rescale_to_std(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), sec. 3.4:
    ``phi * guided * std(cond)/std(guided) + (1 - phi) * guided``, stds per sample over non-batch dims
    (diffusers' ``rescale_noise_cfg``). ``guided`` and ``cond`` must have one shape; ``phi`` is a number in [0, 1].

    A sample whose guided prediction has no spread (``std(guided) = 0``, e.g. a constant prediction, or a single
    value per sample, where the std is undefined) is returned unrescaled: no scaling of a constant matches
    ``std(cond)``. diffusers' ``rescale_noise_cfg`` divides by the zero std there and returns NaN (or inf).
    """
    if not isinstance(guided, torch.Tensor):
        raise TypeError(f"`guided` must be a tensor, got {type(guided).__name__}")
    check_same_shape("cond", cond, "guided", guided)
    phi = check_number("phi", phi, 0.0, 1.0, what="guidance_rescale")
    if math.prod(guided.shape[1:]) < 2:  # one value (or none) per sample: no std (a shape test, no host sync)
        return guided
    dims = _batch_dims(guided)
    std = guided.std(dim=dims, keepdim=True)
    spread = std > 0
    ratio = torch.where(spread, cond.std(dim=dims, keepdim=True) / torch.where(spread, std, 1.0), 1.0)
    return phi * (guided * ratio) + (1.0 - phi) * guided


class CFG(GuidanceRule):
    """Classifier-free guidance (Ho & Salimans 2022) in diffusers' formulation, optional std rescale.

    ``x0 = D_u + w (D_c - D_u)``, ``eps = eps_u + w (eps_c - eps_u)`` (the combination is affine, so it is
    the same on the raw output of any prediction type and stays consistent). ``guidance_scale`` is one
    number or a per-step sequence ``w_i`` (a guidance schedule; length = number of steps).
    ``guidance_rescale`` ``phi`` applies diffusers' ``rescale_noise_cfg`` to the model's raw output, as diffusers'
    pipelines do (``rescale_pair``: the output type comes from the ``StepState``, e.g. ``v`` for SD 2.x
    v-prediction models), and moves the pair with it at fixed ``x_t``; it needs ``alpha > 0``.
    """

    name = "cfg"

    def __init__(self, guidance_scale: float | Sequence[float] = 3.0, guidance_rescale: float = 0.0):
        if isinstance(guidance_scale, np.ndarray) and guidance_scale.ndim == 0:
            guidance_scale = guidance_scale.item()  # a 0-d array is one number
        if isinstance(guidance_scale, (list, tuple, np.ndarray)):
            if len(guidance_scale) == 0:
                raise ValueError("`guidance_scale` sequence must not be empty")
            self.scales: tuple[float, ...] | None = tuple(
                check_number(f"guidance_scale[{i}]", float(w) if isinstance(w, np.floating) else w, 0.0)
                for i, w in enumerate(guidance_scale)
            )
            self.guidance_scale: float | None = None
        else:
            self.scales = None
            self.guidance_scale = check_number("guidance_scale", guidance_scale, 0.0)
        self.guidance_rescale = check_number("guidance_rescale", guidance_rescale, 0.0, 1.0)

    def scale_at(self, state: StepState) -> float:
        if self.scales is None:
            return self.guidance_scale
        if len(self.scales) != state.num_steps:
            raise ValueError(
                f"`guidance_scale` has {len(self.scales)} per-step values but sampling runs {state.num_steps} steps "
                "(one value per solver step; a step whose implicit corrector calls the model twice uses its value "
                "for both calls)"
            )
        return self.scales[state.index]

    @property
    def needs_uncond(self) -> bool:
        """Plain CFG at scale 1 everywhere is the conditional model alone."""
        return self.scales is not None or self.guidance_scale != 1.0 or self.guidance_rescale != 0.0

    def combine(self, cond: Pair, uncond: Pair, state: StepState) -> Pair:
        w = self.scale_at(state)
        x0 = uncond[0] + w * (cond[0] - uncond[0])
        eps = uncond[1] + w * (cond[1] - uncond[1])
        if self.guidance_rescale > 0.0:
            if state.alpha <= 0.0:
                raise ValueError("`guidance_rescale` needs alpha > 0 at every evaluated step (got alpha = 0)")
            if state.prediction_type == "epsilon":
                x0, eps = rescale_eps_pair((x0, eps), cond[1], self.guidance_rescale, state.sigma / state.alpha)
            else:
                x0, eps = rescale_pair((x0, eps), cond, self.guidance_rescale,
                                       rescale_coefficients(state.alpha, state.sigma, state.prediction_type))
        return x0, eps

    def config(self) -> dict:
        scale: Any = list(self.scales) if self.scales is not None else self.guidance_scale
        return {"guidance_scale": scale, "guidance_rescale": self.guidance_rescale}


class CFGPlusPlus(GuidanceRule):
    """CFG++ (Chung et al. 2025, arXiv 2406.08070, sec. 3): guided ``x0``, unconditional renoise ``eps``.

    ``x0 = D_u + lam (D_c - D_u)`` (Tweedie with ``eps_lam = eps_u + lam (eps_c - eps_u)``), ``eps = eps_u``.
    The pair is inconsistent on purpose; the solver's data term uses ``x0`` and its renoise term ``eps``
    (DDIM: ``x_next = alpha' x0 + sigma' eps_u``). ``lam = 0`` is unconditional sampling exactly, ``lam = 1``
    the conditional data term. ``lam`` must lie in [0, 1] (interpolation) unless ``allow_extrapolation``.

    **lam <-> CFG scale.** For any first-order step from ``rho_i`` to ``rho_{i+1}`` (DDIM, Euler) CFG++ is
    CFG with the per-step scale ``w_i = lam rho_i / (rho_i - rho_{i+1})`` (``cfgpp_equivalent_scales``). The
    factor depends on the grid, hence on the step count: strong mid-trajectory, ``lam`` at the last step
    (``rho = 0``), larger on average with more steps (SD1.5 DDIM: mean about 12 at 50 steps, 5 at 20).
    So a ``lam`` that matches some CFG scale at one NFE does not match it at another.

    **Multistep solvers** (``history``): with ``"guided"`` (the default; the pair contract) data-prediction solvers
    (DPM-Solver++, UniPC) buffer the guided ``x0`` for their derivative terms; noise-prediction ones buffer
    ``eps_u``. With ``"unconditional"`` earlier evaluations are remembered by their *unconditional* pair, as the
    official SD1.5 code's ``DPMpp2mCFGppSolver`` and ComfyUI's ``dpmpp_2m_cfg_pp`` keep them: DPM-Solver++ 2M
    then steps ``x' = D_lam + e^-h (x - D_u) + (1 - e^-h)/(2r) (D_lam - D_u,prev)`` (in ``x/alpha``, ``rho``
    coordinates). A transition's base and the newest evaluation keep the guided pair, so UniPC's corrector stays
    guided. First-order steps (DDIM) and noise-prediction solvers (whose buffer holds ``eps_u`` either way) are
    the same with both. Eager loops only (graph mode refuses it), and not with step hooks (DC-Solver, FlowChef).
    """

    name = "cfg++"
    needs_uncond = True
    HISTORIES = ("guided", "unconditional")

    def __init__(self, guidance_scale: float = 0.6, allow_extrapolation: bool = False, history: str = "guided"):
        if history not in self.HISTORIES:
            raise ValueError(f"`history` must be one of {list(self.HISTORIES)}, got {history!r}")
        self.history = history
        self.allow_extrapolation = check_bool("allow_extrapolation", allow_extrapolation, numpy_ok=True)
        if self.allow_extrapolation:
            self.guidance_scale = check_number("guidance_scale", guidance_scale, 0.0)
        else:
            self.guidance_scale = check_number(
                "guidance_scale",
                guidance_scale,
                0.0,
                1.0,
                allowed="[0, 1] for CFG++ (pass allow_extrapolation=True for larger values)",
            )

    def combine(self, cond: Pair, uncond: Pair, state: StepState) -> Pair:
        lam = self.guidance_scale
        return uncond[0] + lam * (cond[0] - uncond[0]), uncond[1]

    def history_pair(self, cond: Pair, uncond: Pair) -> Pair | None:
        return uncond if self.history == "unconditional" else None

    def config(self) -> dict:
        config = {"guidance_scale": self.guidance_scale, "allow_extrapolation": self.allow_extrapolation}
        if self.history != "guided":  # (the default is left out: reports and cache keys of earlier runs stay valid)
            config["history"] = self.history
        return config


def check_norm_threshold(norm_threshold: Any) -> float | None:
    """APG's clip threshold ``r``: a number in ``(0, inf]`` or ``None`` (no clipping). (diffusers reads ``r <= 0`` as
    no clipping; here 0 would zero the guidance and a negative ``r`` reverse it, so both are refused.)"""
    if norm_threshold is None or (isinstance(norm_threshold, (int, float)) and norm_threshold == math.inf):
        return norm_threshold
    return check_number("norm_threshold", norm_threshold, 0.0, low_open=True, allowed="(0, inf] or None (no clipping)")


def check_norm_dims(norm_dims: Any) -> tuple[int, ...] | None:
    """APG's per-sample norm dimensions: ``None`` (all non-batch dims), one int (diffusers' ``norm_dim``) or
    distinct ints, none naming the batch dimension 0."""
    if norm_dims is None:
        return None
    if isinstance(norm_dims, (int, np.integer)) and not isinstance(norm_dims, bool):
        norm_dims = (norm_dims,)
    if isinstance(norm_dims, (str, bytes)) or not hasattr(norm_dims, "__iter__") or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in norm_dims
    ):
        raise ValueError(f"`norm_dims` must be non-batch dimensions (ints, not 0), got {norm_dims!r}")
    dims = tuple(int(d) for d in norm_dims)
    if not dims or any(d == 0 for d in dims) or len(set(dims)) != len(dims):
        raise ValueError(f"`norm_dims` must be distinct non-batch dimensions (not 0), got {norm_dims!r}")
    return dims


def rescale_coefficients(alpha: float, sigma: float, prediction_type: str) -> tuple[float, float, float, float]:
    """``(c_x0, c_eps, m_x0, m_eps)`` (host float64) for :func:`rescale_pair`: the raw output of a consistent pair
    is ``c_x0 x0 + c_eps eps`` -- ``epsilon`` (0, 1), ``sample`` (1, 0), ``v_prediction`` (-sigma, alpha), ``flow``
    (-1, 1) -- and a change ``d`` of it at fixed ``x_t = alpha x0 + sigma eps`` moves the pair by ``(m_x0 d,
    m_eps d) = k d (-sigma, alpha)``, ``k = 1 / (alpha c_eps - sigma c_x0)``."""
    c_x0, c_eps = {"epsilon": (0.0, 1.0), "sample": (1.0, 0.0), "v_prediction": (-sigma, alpha),
                   "flow": (-1.0, 1.0)}[prediction_type]
    k = 1.0 / (alpha * c_eps - sigma * c_x0)
    return c_x0, c_eps, -sigma * k, alpha * k


def rescale_eps_pair(guided: Pair, cond_eps: torch.Tensor, phi: float, sigma_over_alpha: Any) -> Pair:
    """:func:`rescale_pair` for an ``epsilon`` model, where the raw output is ``eps`` itself: ``eps`` rescaled, ``x0``
    moved by ``-(sigma/alpha)`` of its change (``sigma_over_alpha`` a host float or a 0-dim device tensor)."""
    new_eps = rescale_to_std(guided[1], cond_eps, phi)
    return guided[0] - sigma_over_alpha * (new_eps - guided[1]), new_eps


def rescale_pair(guided: Pair, cond: Pair, phi: float, coefficients: Sequence[Any]) -> Pair:
    """diffusers' ``rescale_noise_cfg`` (:func:`rescale_to_std`) on the model's raw output, the guided pair moved so
    that ``x_t`` stays fixed; ``coefficients`` from :func:`rescale_coefficients` (host floats, or the same numbers
    as 0-dim device tensors in the static step: identical arithmetic, no host sync)."""
    c_x0, c_eps, m_x0, m_eps = coefficients
    raw = c_x0 * guided[0] + c_eps * guided[1]
    d = rescale_to_std(raw, c_x0 * cond[0] + c_eps * cond[1], phi) - raw
    return guided[0] + m_x0 * d, guided[1] + m_eps * d


def apg_update(
    diff: torch.Tensor,
    cond: torch.Tensor,
    eta: float,
    norm_threshold: float | None,
    norm_dims: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """APG's guidance direction (Sadat et al. 2025, arXiv 2410.02416, Alg. 1, after momentum).

    Clip ``diff`` to L2 norm ``norm_threshold`` per sample (``diff * min(1, r/||diff||)``; ``None`` = no
    clip), split it into the parts parallel and orthogonal to ``cond`` (projection in float64, per sample
    over ``norm_dims``, default all non-batch dims) and return ``diff_perp + eta * diff_par``. ``cond`` must
    have the shape of ``diff`` (each sample is projected on its own ``cond``); ``eta`` is a number >= 0.
    """
    if not isinstance(diff, torch.Tensor):
        raise TypeError(f"`diff` must be a tensor, got {type(diff).__name__}")
    check_same_shape("cond", cond, "diff", diff)
    eta = check_number("eta", eta, 0.0)
    norm_threshold = check_norm_threshold(norm_threshold)
    dims = list(check_norm_dims(norm_dims)) if norm_dims is not None else _batch_dims(diff)
    if any(not -diff.ndim <= d < diff.ndim for d in dims):
        raise ValueError(f"`norm_dims` {tuple(dims)} name dimensions that {diff.ndim}-D predictions do not have")
    if any(d % diff.ndim == 0 for d in dims):  # a negative dim can name the batch dimension too
        raise ValueError(f"`norm_dims` {tuple(dims)} include the batch dimension of {diff.ndim}-D predictions; "
                         "give non-batch dimensions")
    if norm_threshold is not None and math.isfinite(norm_threshold):
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * (norm_threshold / norm).clamp(max=1.0)  # ||diff|| = 0 -> inf -> 1
    d64, c64 = diff.double(), cond.double()
    unit = c64 / c64.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)
    parallel = (d64 * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = d64 - parallel
    return (orthogonal + eta * parallel).to(diff.dtype)


class APG(GuidanceRule):
    """Adaptive projected guidance (Sadat, Hilliges & Weber, ICLR 2025, arXiv 2410.02416, Alg. 1), paper form.

    Per evaluation, in the denoised (``x0``) space by default (``space="x0"``)::

        Delta = D_c - D_u
        m     = Delta + beta m          (reverse momentum, beta < 0; m = 0 at the start of a generation)
        Delta = m * min(1, r/||m||)     (per-sample L2 norm clip, threshold r)
        Delta_par = <Delta, D_c>/||D_c||^2 D_c,  Delta_perp = Delta - Delta_par
        D     = D_c + (w - 1)(Delta_perp + eta Delta_par)

    and ``eps`` is moved so the pair stays consistent (``eps = eps_c - (alpha/sigma)(D - D_c)``).
    ``space="eps"`` runs the same algebra on the noise predictions instead. Defaults follow the paper:
    ``eta = 0``; ``norm_threshold`` r = 15 and ``momentum`` beta = -0.5 are its SDXL-latent values (r is in
    units of the ``x0`` norm and scales with ``sqrt(numel)``: retune it per model). Neutral settings
    ``eta=1, norm_threshold=None, momentum=0`` are plain CFG with scale ``w``.

    The momentum ``m`` lives on this object (``reset()`` starts a generation): generations that run at the same
    time each need their own rule (``APG(**rule.config())``), as with diffusers' own APG guider.

    Versus diffusers' ``AdaptiveProjectedGuidance``: diffusers works on the raw model output (eps/v/flow
    velocity, not x0), defaults to ``eta=1`` and no momentum (CFG plus norm clipping) and, unless
    ``use_original_formulation=True``, adds the update to the unconditional output with scale ``w``
    (``D_u + w Delta~`` instead of ``D_c + (w-1) Delta~``). Paper ``w`` == diffusers ``guidance_scale = w - 1``
    with ``use_original_formulation=True`` (see ``fewstep.guidance.guiders``).
    """

    name = "apg"
    needs_uncond = True
    SPACES = ("x0", "eps")

    def __init__(
        self,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        norm_threshold: float | None = 15.0,
        momentum: float = -0.5,
        space: str = "x0",
        norm_dims: Sequence[int] | None = None,
    ):
        self.guidance_scale = check_number("guidance_scale", guidance_scale, 0.0)
        self.eta = check_number("eta", eta, 0.0)
        self.norm_threshold = check_norm_threshold(norm_threshold)
        self.momentum = check_number("momentum", momentum, -1.0, 1.0, allowed="(-1, 1)")
        if abs(self.momentum) == 1.0:
            raise ValueError(f"`momentum` must be a finite number in (-1, 1), got {momentum!r}")
        if space not in self.SPACES:
            raise ValueError(f"`space` must be one of {list(self.SPACES)}, got {space!r}")
        self.space = space
        self.norm_dims = check_norm_dims(norm_dims)
        self._buffer: torch.Tensor | None = None

    def reset(self) -> None:
        self._buffer = None

    def direction(self, diff: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Momentum (updating the buffer), clip and projection of ``diff = cond - uncond`` (any space)."""
        if self.momentum != 0.0:
            diff = diff if self._buffer is None else diff + self.momentum * self._buffer
            self._buffer = diff
        return apg_update(diff, cond, self.eta, self.norm_threshold, self.norm_dims)

    def combine(self, cond: Pair, uncond: Pair, state: StepState) -> Pair:
        w1 = self.guidance_scale - 1.0
        if self.space == "x0":
            x0 = cond[0] + w1 * self.direction(cond[0] - uncond[0], cond[0])
            eps = cond[1] - (state.alpha / state.sigma) * (x0 - cond[0])
            return x0, eps
        if state.alpha <= 0.0:
            raise ValueError("APG with space='eps' needs alpha > 0 at every evaluated step (got alpha = 0)")
        eps = cond[1] + w1 * self.direction(cond[1] - uncond[1], cond[1])
        x0 = cond[0] - (state.sigma / state.alpha) * (eps - cond[1])
        return x0, eps

    def config(self) -> dict:
        return {
            "guidance_scale": self.guidance_scale,
            "eta": self.eta,
            "norm_threshold": self.norm_threshold,
            "momentum": self.momentum,
            "space": self.space,
            "norm_dims": None if self.norm_dims is None else list(self.norm_dims),
        }


def cfgpp_equivalent_scales(guidance_scale: float, rhos: Sequence[float] | np.ndarray) -> list[float]:
    """Per-step CFG scales ``w_i = lam rho_i / (rho_i - rho_{i+1})`` that make CFG equal CFG++ (``lam``) on a
    first-order (DDIM/Euler) grid ``rho_0 > ... > rho_N`` (``rho = sigma/alpha``; ``rho_i = inf``, the pure
    noise end of a flow grid, gives ``lam``).

    Derivation: in ``x/alpha`` coordinates a CFG step moves by ``(rho_{i+1} - rho_i)(eps_u + w d_eps)``, a
    CFG++ step by ``(rho_{i+1} - rho_i) eps_u - lam rho_i d_eps``. The result depends on the grid, i.e. on
    the number of steps.
    """
    lam = check_number("guidance_scale", guidance_scale, 0.0, what="CFG++ lambda")
    r = np.asarray(rhos, dtype=np.float64)
    # only the first level may be inf (pure noise); comparing the rest keeps inf - inf out of the check
    if (r.ndim != 1 or r.size < 2 or np.any(np.isnan(r)) or np.any(np.isinf(r[1:])) or r[-1] < 0
            or np.any(np.diff(r[1:]) >= 0) or not r[0] > r[1]):
        if r.ndim == 1 and r.size >= 2 and r[-1] == r[-2] and r[-1] > 0 and not np.any(np.diff(r[1:-1]) >= 0):
            raise ValueError(f"`rhos` ends with a step of zero length ({r[-2]!r} to {r[-1]!r}, e.g. "
                             "final_sigmas_type='sigma_min'): CFG++ still moves the sample there and CFG cannot, so no "
                             "CFG scale is equivalent; use a grid ending at final_sigmas_type='zero'")
        raise ValueError(f"`rhos` must be a strictly decreasing sequence of >= 2 levels >= 0 (only the first may be "
                         f"inf), got {r.tolist()}")
    out = []
    for i in range(r.size - 1):
        out.append(lam if math.isinf(r[i]) else float(lam * r[i] / (r[i] - r[i + 1])))
    return out


def scheduler_rhos(scheduler: Any) -> np.ndarray:
    """The ``rho = sigma/alpha`` levels (N + 1 values) of a scheduler after ``set_timesteps``: a fewstep
    scheduler's grid, or diffusers' ``EulerDiscreteScheduler``-style ``sigmas`` (already ``rho``) and
    ``FlowMatchEulerDiscreteScheduler`` (``s``, so ``rho = s/(1 - s)``)."""
    plan = getattr(scheduler, "plan", None)
    if plan is not None:
        a, s = plan.grid.alphas, plan.grid.sigmas
        with np.errstate(divide="ignore"):
            return np.where(a > 0, s / np.where(a > 0, a, 1.0), np.inf)
    name = type(scheduler).__name__
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or name not in ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"):
        raise ValueError(
            f"cannot read the noise levels of {name}: use a fewstep scheduler, EulerDiscreteScheduler or "
            "FlowMatchEulerDiscreteScheduler (after set_timesteps)"
        )
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError(f"{name} has no sampling grid yet: call set_timesteps before reading its noise levels (its "
                         "sigmas are still the training levels)")
    s = torch.as_tensor(sigmas).detach().double().cpu().numpy()
    if name == "FlowMatchEulerDiscreteScheduler":
        with np.errstate(divide="ignore"):
            return np.where(s < 1, s / np.where(s < 1, 1 - s, 1.0), np.inf)
    return s
