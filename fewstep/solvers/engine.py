"""The unified multistep exponential-integrator engine.

One engine executes DDIM, DPM-Solver(++) 1-3M, UniPC and the methods built on them. Each step is a
``StepDecision`` (prediction type, order, derivative points, coefficient rule, relaxation, corrector);
``compile_plan`` turns decisions plus a ``TimeGrid`` into plain float coefficients once, on the host, in
float64. ``EngineState.advance`` then does tensor arithmetic only: no host sync, no branch on tensor
values, so a whole sampling loop can be captured in a CUDA graph.

**The update.** With ``h = lambda_t - lambda_s`` and buffered evaluations ``(x_j^eval, x0_j, eps_j)``,
a step from ``s`` to ``t`` is (Lu et al. 2022b, eq. 9 / Zhang & Chen 2023, written in "pair form")::

    x_t = L (x_s - x_s^eval) + alpha_t x0_s + sigma_t eps_s + sum_j w_j (F_j - F_s)

``F = x0`` and ``L = sigma_t/sigma_s`` for data prediction, ``F = eps`` and ``L = alpha_t/alpha_s`` for
noise prediction. For a consistent pair (``x^eval = alpha x0 + sigma eps``) and ``x_s = x_s^eval`` the
first three terms are exactly DDIM in either form; ``x_s - x_s^eval`` carries a corrector's move of
the sample (UniPC); an inconsistent pair expresses CFG++ (guided ``x0``, unconditional ``eps``) with
no change to any solver. The derivative terms use the Taylor expansion
``F(lambda_s + r h) = sum_k D_k r^k / k!`` (``D_k ~ h^k F^(k)``), fitted through the chosen points,
with coefficients ``-c * hh * phi_{k+1}(hh)``, where ``hh = -h, c = alpha_t`` (data) or
``hh = h, c = sigma_t`` (noise); coefficient rules reproduce DPM-Solver++'s midpoint/heun choices and
UniPC's ``B(h)`` (Zhao et al. 2023, eq. 8).

**Stochastic steps** (``stochastic=True``; SDE-DPM-Solver(++), Lu et al. 2022b sec. 5 / Gonzalez et al.;
the SDE updates of MRS, Li et al. 2025 sec. 4.2): the reverse SDE's exact linear part and noise integral,
``x_t = L' (x_s - x_eval) + alpha_t x0 + c_eps eps + sum_j w_j (F_j - F_s) + c_z z`` with, for data
prediction, ``L' = (sigma_t/sigma_s) e^{-h}``, ``c_eps = sigma_t e^{-h}``, ``c_z = sigma_t sqrt(1 - e^{-2h})`` and
the derivative weights of a step of length ``2h``; for noise prediction ``c_eps = sigma_t (2 - e^h)``,
``c_z = sigma_t sqrt(e^{2h} - 1)`` and twice the ODE's derivative weights. ``z`` is fresh standard noise
the caller passes to ``advance``.

**EMS steps** (``prediction="ems"``, DPM-Solver-v3): the same buffer and the same corrector, but the transition
is compiled to per-element coefficients on the buffered pairs from empirical model statistics
(``solvers.ems.EMSTransition``); ``compile_plan(..., ems=EMSGrid(...))`` supplies the tables and each grid
point's index on the EMS grid. ``pseudo``/``corrector_pseudo`` estimate the ``k``-th derivative from the ``k + 1``
nearest points (divided differences) instead of the Taylor fit through all points.

**Corrector.** ``"unic"``: after the model is evaluated at the predicted ``x_t``, the same transition is
redone with the new point among the derivative points (UniC of UniPC; the "pseudo" corrector of
USF/DPM-Solver-v3), at no extra NFE. The buffered evaluation keeps the uncorrected ``x^eval``.

``"implicit"``: the same correction, then the model is called again at the corrected point (same time) and
that evaluation replaces the predicted one in the buffer before the next predictor (predict-evaluate-correct-
evaluate; USF's implicit corrector, one extra NFE). Such a plan has more model calls than steps: ``Plan.calls``
lists them as ``(grid point, re-evaluation?)`` and ``EngineState.call`` dispatches them.

**Analytical first step** (AFS, USF's ``zero_x0`` / ``average_x0``; ``with_analytic_first_step``): the
evaluation at the first time point ``t_0`` is not a model call but the pair ``x0 = m, eps = (x_0 - alpha_0 m) /
sigma_0`` with ``m = 0`` (``zero_x0``) or the data's mean image (``average_x0``), so its first-order step is
``x_1 = (sigma_1 / sigma_0) x_0 + (alpha_1 - sigma_1 alpha_0 / sigma_0) m`` and the plan starts at ``t_1`` (the
caller starts from ``AnalyticStart.start(noise)``). The engine buffers that analytic point before the first real
evaluation, so later steps may use it as a derivative point (and the first real step's corrector may correct
from it): one NFE saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch

from .._checks import check_int, check_number
from .ems import EMS, EMSTransition, derivative_matrix, ems_transition
from .grids import TimeGrid
from .momentum import MomentumState, MomentumStep
from .parameterization import compute_dtype
from .phi import hphi

__all__ = [
    "PREDICTIONS",
    "COEFFICIENT_RULES",
    "CORRECTORS",
    "StepDecision",
    "Transition",
    "CompiledStep",
    "Plan",
    "compile_plan",
    "restart_decisions",
    "derivative_weights",
    "EngineState",
    "Evaluation",
    "sample_loop",
    "EMSGrid",
    "AnalyticStart",
    "check_analytic_first_decision",
    "with_analytic_first_step",
]

PREDICTIONS = ("data", "noise", "ems")
COEFFICIENT_RULES = ("taylor", "bh1", "bh2", "dpmsolver", "dpmsolver-heun", "euler-maruyama")
CORRECTORS = ("none", "unic", "implicit")


@dataclass(frozen=True)
class StepDecision:
    """The per-step decisions of the unified sampling framework (USF, Liu et al. 2024, sec. 3).

    Attributes:
        prediction: ``"data"`` (integrate ``x0``), ``"noise"`` (integrate ``eps``) or ``"ems"`` (DPM-Solver-v3's
            per-element reparameterisation by empirical model statistics; needs ``compile_plan(..., ems=)``).
        order: Taylor order ``p`` of the predictor; it uses ``p - 1`` buffered points besides the start.
        points: buffer offsets of those points (``1`` = previous evaluation); default ``1..p-1``.
        coefficients: ``"taylor"`` (exact phi coefficients), ``"bh1"``/``"bh2"`` (UniPC's ``B(h)`` when a
            single derivative point is used), ``"dpmsolver"``/``"dpmsolver-heun"`` (diffusers'
            DPM-Solver++ midpoint/heun second order and its third-order multistep weights).
        relaxation: linear relaxation ``c`` of the first-derivative term, scaled by ``1 + c h`` (USF).
        corrector: ``"none"``, ``"unic"`` (correct this step's result after the next evaluation, which stays in
            the buffer: no extra NFE) or ``"implicit"`` (the same correction, then the model is evaluated again at
            the corrected point and that evaluation replaces the predicted one: +1 NFE).
        pseudo: estimate the ``k``-th derivative from the ``k + 1`` nearest points only (Newton divided
            differences; DPM-Solver-v3's pseudo-order predictor) instead of the Taylor fit through all points.
        corrector_order: order of the corrector (default ``order + 1``: UniC, every predictor point plus the new
            one); ``order`` drops the oldest point (DPM-Solver-v3's corrector without ``c_pseudo``).
        corrector_pseudo: pseudo-order derivatives in the corrector (v3's ``c_pseudo``).
        stochastic: integrate the reverse SDE instead of the probability-flow ODE (needs fresh noise per step).
            ``coefficients="euler-maruyama"`` (order 1, noise prediction, stochastic) is the plain
            Euler-Maruyama step of the reverse VP SDE, the baseline exponential integrators are compared with.
    """

    prediction: str = "data"
    order: int = 1
    points: tuple[int, ...] | None = None
    coefficients: str = "taylor"
    relaxation: float = 0.0
    corrector: str = "none"
    stochastic: bool = False
    pseudo: bool = False
    corrector_order: int | None = None
    corrector_pseudo: bool = False

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"`prediction` must be one of {list(PREDICTIONS)}, got {self.prediction!r}")
        if isinstance(self.order, (bool, np.bool_)) or not isinstance(self.order, (int, np.integer)) or not (
                1 <= self.order <= 5):
            raise ValueError(f"`order` must be an integer in [1, 5], got {self.order!r}")
        if self.coefficients not in COEFFICIENT_RULES:
            raise ValueError(f"`coefficients` must be one of {list(COEFFICIENT_RULES)}, got {self.coefficients!r}")
        if self.corrector not in CORRECTORS:
            raise ValueError(f"`corrector` must be one of {list(CORRECTORS)}, got {self.corrector!r}")
        if not isinstance(self.stochastic, bool):
            raise ValueError(f"`stochastic` must be a bool, got {self.stochastic!r}")
        if self.stochastic and self.corrector != "none":
            raise ValueError("a stochastic (SDE) step cannot have a corrector")
        if self.coefficients == "euler-maruyama" and (
            not self.stochastic or self.order != 1 or self.prediction != "noise"
        ):
            raise ValueError("`coefficients='euler-maruyama'` needs stochastic=True, order=1 and prediction='noise'")
        for name in ("pseudo", "corrector_pseudo"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}")
        if (self.pseudo or self.corrector_pseudo) and self.coefficients != "taylor":
            raise ValueError(f"pseudo-order derivatives need coefficients='taylor', got {self.coefficients!r}")
        if self.corrector_order is not None:
            c = self.corrector_order
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 2 <= c <= self.order + 1:
                allowed = f"[2, order + 1 = {self.order + 1}]"
                raise ValueError(f"`corrector_order` must be an integer in {allowed}, got {c!r}")
        check_number("relaxation", self.relaxation)
        if self.prediction == "ems" and (self.stochastic or self.coefficients != "taylor" or self.relaxation != 0.0):
            raise ValueError("prediction='ems' (DPM-Solver-v3) supports ODE steps with coefficients='taylor' and no "
                             "relaxation only")
        if self.points is not None:
            if isinstance(self.points, (str, bytes)) or not all(
                isinstance(p, (int, np.integer)) and not isinstance(p, (bool, np.bool_)) for p in self.points
            ):
                raise ValueError(f"`points` must be integer buffer offsets, got {self.points!r}")
            pts = tuple(int(p) for p in self.points)
            if len(pts) != self.order - 1 or len(set(pts)) != len(pts) or any(p < 1 for p in pts):
                raise ValueError(
                    f"`points` must be {self.order - 1} distinct buffer offsets >= 1 for order {self.order}, "
                    f"got {self.points!r}"
                )
            object.__setattr__(self, "points", pts)

    @property
    def derivative_points(self) -> tuple[int, ...]:
        return self.points if self.points is not None else tuple(range(1, self.order))

    @property
    def corrector_points(self) -> int:
        """How many derivative points the corrector of this step uses (the new evaluation first)."""
        return (self.corrector_order if self.corrector_order is not None else self.order + 1) - 1


@dataclass(frozen=True)
class Transition:
    """Coefficients of one transition ``s -> t`` in pair form (see the module docstring).

    ``base`` is the buffer offset of the start point ``s`` at the time the transition is applied;
    ``weights`` maps buffer offsets to the weight of ``F_j - F_base``.
    """

    kind: str
    base: int
    lin: float
    alpha_t: float
    sigma_t: float
    weights: tuple[tuple[int, float], ...]
    noise: float = 0.0


@dataclass(frozen=True)
class CompiledStep:
    """Step ``i``: an optional corrector of the previous transition, then the predictor to point ``i+1``.
    ``reevaluate``: the corrector is implicit; the model is called again at the corrected point first."""

    corrector: Transition | None
    predictor: Transition
    reevaluate: bool = False


@dataclass
class Plan:
    """A compiled sampler: grid, decisions, coefficients and the buffer size it needs."""

    grid: TimeGrid
    decisions: list[StepDecision]
    steps: list[CompiledStep]
    buffer_size: int
    extra: dict = field(default_factory=dict)
    #: optional heavy-ball/GHVB momentum per transition ``i -> i+1`` (``None`` entries: plain step); the
    #: transition is realised by step ``i``'s predictor, or by step ``i+1``'s corrector when one follows.
    momentum: list[MomentumStep | None] | None = None
    #: the analytical first step this plan starts after (``with_analytic_first_step``), or ``None``
    analytic_start: AnalyticStart | None = None

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @cached_property
    def calls(self) -> list[tuple[int, bool]]:
        """The model calls in order, as ``(grid point, re-evaluation?)``: one per step, plus a second call at
        the corrected point of every step whose corrector is implicit."""
        out = []
        for i, step in enumerate(self.steps):
            out.append((i, False))
            if step.reevaluate:
                out.append((i, True))
        return out

    @property
    def nfe(self) -> int:
        """Model evaluations: the grid's steps plus one per implicit corrector (``step`` asks every call: the
        length of the cached call list, not a sum over the steps, which made a run O(N^2))."""
        return len(self.calls)

    def prepare_tensors(self, device: torch.device | str | None, dtype: torch.dtype = torch.float32) -> None:
        """Move the per-element coefficients of EMS transitions (DPM-Solver-v3 steps) to ``device`` in ``dtype``
        now, in ``set_timesteps``: converted at their first ``step`` they were host-to-device copies inside the
        loop (a host sync each on CUDA)."""
        like = torch.empty(0, device=device, dtype=dtype)
        for step in self.steps:
            for tr in (step.corrector, step.predictor):
                if hasattr(tr, "tensors"):
                    tr.tensors(like)


def _taylor_coefficients(m: int, hh: float, scale: float) -> list[float]:
    """``-scale * hh * phi_{k+1}(hh)`` for ``k = 1..m`` (coefficients of ``D_k ~ h^k F^(k)``)."""
    return [-scale * hphi(k + 1, hh) for k in range(1, m + 1)]


def derivative_weights(
    offsets_r: Sequence[float],
    hh: float,
    scale: float,
    rule: str = "taylor",
    relaxation_h: float = 1.0,
    pseudo: bool = False,
) -> np.ndarray:
    """Weights ``w_j`` on ``F_j - F_s`` for points at ``lambda_s + r_j h``.

    Solves the Vandermonde system ``sum_k D_k r_j^k / k! = F_j - F_s`` (k = 1..m) and weighs the
    scaled derivatives with the rule's coefficients; ``relaxation_h`` multiplies the first one.
    ``pseudo``: divided differences instead (see ``ems.derivative_matrix``).
    """
    r = np.asarray(offsets_r, dtype=np.float64)
    m = r.size
    if m == 0:
        return np.zeros(0)
    if np.any(r == 0) or len(set(r.tolist())) != m:
        raise ValueError(f"derivative points must be distinct and differ from the start point, got r={r.tolist()}")
    if m == 1 and rule in ("bh1", "bh2", "dpmsolver"):
        b_h = hh if rule == "bh1" else math.expm1(hh)
        c1 = -scale * 0.5 * b_h
        return np.array([c1 * relaxation_h / r[0]])
    coeffs = _taylor_coefficients(m, hh, scale)
    if m == 2 and rule in ("dpmsolver", "dpmsolver-heun"):
        # diffusers' multistep_dpm_solver_third_order_update weighs its second difference this way.
        coeffs[1] *= 0.5
    coeffs[0] *= relaxation_h
    if pseudo:
        return np.asarray(coeffs) @ derivative_matrix(r, pseudo=True)
    vander = np.stack([r**k / math.factorial(k) for k in range(1, m + 1)], axis=1)  # [j, k]
    # D = V^{-1} dF  =>  sum_k c_k D_k = (c^T V^{-1}) dF
    return np.linalg.solve(vander.T, np.asarray(coeffs))


@dataclass(frozen=True)
class EMSGrid:
    """DPM-Solver-v3 tables for a plan: the EMS and, per grid point (``N + 1``), its EMS grid index (``-1``
    for a point off the EMS grid, such as a final clean target, which only non-``ems`` steps may reach)."""

    ems: EMS
    indices: tuple[int, ...]

    def index(self, j: int) -> int:
        k = self.indices[j]
        if k < 0:
            raise ValueError(f"grid point {j} is not on the EMS grid (a clean target?): use a data step to reach it")
        return k


def _ems_transition(grid, s, t, points, base, pseudo, ems: EMSGrid | None) -> EMSTransition:
    if ems is None:
        raise ValueError("prediction='ems' needs EMS tables: compile_plan(..., ems=EMSGrid(...))")
    idx = {j: ems.index(j) for j in (s, t, *points)}
    alphas = {idx[j]: float(grid.alphas[j]) for j in idx}
    sigmas = {idx[j]: float(grid.sigmas[j]) for j in idx}
    offsets = {idx[j]: base + s - j for j in (s, *points)}
    # one compilation per distinct transition of these tables: set_timesteps runs again for every generation, and
    # the per-element integrals cost ~5 ms a step on 16x16 digits (~0.2 s on SD latents); a hit also keeps the
    # coefficients already moved to the device (EMSTransition.tensors)
    key = (idx[s], idx[t], tuple(idx[j] for j in points), tuple(sorted(alphas.items())),
           tuple(sorted(sigmas.items())), tuple(sorted(offsets.items())), bool(pseudo))
    cache = _transition_cache(ems.ems)
    hit = cache.get(key)
    if hit is None:
        hit = ems_transition(ems.ems, idx[s], idx[t], [idx[j] for j in points], alphas=alphas, sigmas=sigmas,
                             offsets=offsets, pseudo=pseudo)
        size = _transition_bytes(hit)
        if cache.bytes + size > _TRANSITION_CACHE_BYTES:  # bounded by memory, not by count: one SD-sized
            cache.clear()  # transition holds ~0.8 MB of float64 arrays (plus its device copies)
        cache[key] = hit
        cache.bytes += size
    return hit


#: host bytes of compiled EMS transitions kept per EMS object (~300 transitions of SD-sized tables: a 75-step run)
_TRANSITION_CACHE_BYTES = 256 * 2**20


class _TransitionCache(dict):
    """Compiled transitions by key, with the host bytes they hold (``bytes``; ``clear`` resets it)."""

    bytes = 0

    def clear(self) -> None:
        super().clear()
        self.bytes = 0


def _transition_bytes(tr: Any) -> int:
    """Host bytes of a compiled EMS transition's coefficient arrays (its device copies are half of it in float32)."""
    arrays = [tr.lin, tr.const, *(a for _, cx, ce in tr.terms for a in (cx, ce))]
    return int(sum(np.asarray(a).nbytes for a in arrays))


def _transition_cache(tables: Any) -> _TransitionCache:
    """The compiled-transition cache of an EMS object, kept on the object itself (it dies with the tables)."""
    cache = tables.__dict__.get("_compiled_transitions")
    if cache is None:
        cache = tables.__dict__["_compiled_transitions"] = _TransitionCache()
    return cache


def _transition(
    grid: TimeGrid,
    s: int,
    t: int,
    prediction: str,
    points: Sequence[int],
    rule: str,
    relaxation: float,
    base: int,
    stochastic: bool = False,
    pseudo: bool = False,
    ems: EMSGrid | None = None,
) -> Transition | EMSTransition:
    """Compile the transition from grid point ``s`` to ``t`` using grid points ``points`` for derivatives.

    ``base`` is the buffer offset of ``s`` when applied; grid point ``j`` sits at offset ``base + s - j``.
    """
    if prediction == "ems":
        return _ems_transition(grid, s, t, points, base, pseudo, ems)
    a_s, s_s, a_t, s_t = grid.alphas[s], grid.sigmas[s], grid.alphas[t], grid.sigmas[t]
    lam_s, lam_t = grid.lambdas[s], grid.lambdas[t]
    h = lam_t - lam_s
    eps_coef, noise, weight_scale = s_t, 0.0, 1.0
    if prediction == "data":
        lin, hh, scale = s_t / s_s, -h, a_t
    else:
        lin, hh, scale = a_t / a_s, h, s_t
    if stochastic and rule == "euler-maruyama":
        # Reverse SDE dx = [f x + g^2 eps/sigma] dt + g dw with f dt = d(log alpha), g^2 |dt| = 2 sigma^2 d(lambda):
        # x_t = (1 + dl) x_s - 2 sigma_s h eps + sigma_s sqrt(2h) z, evaluated at the start point.
        if not math.isfinite(h):
            raise ValueError(f"step {s}->{t} ends at sigma = 0: Euler-Maruyama needs a final sigma > 0")
        dl = math.log(a_t / a_s)
        lin = 1.0 + dl
        eps_coef = lin * s_s - 2.0 * s_s * h
        return Transition(prediction, base, lin, lin * a_s, eps_coef, (), s_s * math.sqrt(2.0 * h))
    if stochastic:
        if prediction == "data":
            decay = math.exp(-h) if math.isfinite(h) else 0.0
            lin, eps_coef = lin * decay, s_t * decay
            noise = s_t * math.sqrt(-math.expm1(-2.0 * h)) if s_t > 0 else 0.0
            hh = -2.0 * h
        else:
            if s_t > 0:
                eps_coef = s_t * (2.0 - math.exp(h))
                noise = s_t * math.sqrt(math.expm1(2.0 * h))
            else:
                eps_coef = 0.0
            weight_scale = 2.0
    weights: tuple[tuple[int, float], ...] = ()
    if points and h != 0.0:  # a zero-length step (target == start) needs no derivative terms
        if not math.isfinite(h):
            raise ValueError(
                f"step {s}->{t} ends at sigma = 0: higher-order terms diverge there; use order 1 for this step"
            )
        r = [(grid.lambdas[j] - lam_s) / h for j in points]
        w = weight_scale * derivative_weights(r, hh, scale, rule, 1.0 + relaxation * h, pseudo)
        weights = tuple((base + s - j, float(wj)) for j, wj in zip(points, w))
    return Transition(prediction, base, float(lin), float(a_t), float(eps_coef), weights, float(noise))


def restart_decisions(decisions: Sequence[StepDecision], start: int) -> list[StepDecision]:
    """The decisions of a run that begins at grid point ``start`` with an empty buffer (img2img, which starts
    part-way down the grid): step ``start + j`` has only the ``j`` evaluations made since, so derivative points
    further back are dropped and the order falls to what remains (at most ``j + 1``), the warm-up multistep
    solvers do at the start of a run (diffusers counts it in ``lower_order_nums``). A corrector's order is capped
    at the new order + 1. Steps before ``start`` are returned unchanged (they are never run)."""
    check_int("start", start, 0, len(decisions) - 1)
    out = list(decisions)
    for j, d in enumerate(decisions[start:]):
        points = d.derivative_points
        keep = tuple(p for p in points if p <= j)
        if len(keep) == len(points):
            continue
        order = len(keep) + 1
        corrector_order = None if d.corrector_order is None else min(d.corrector_order, order + 1)
        out[start + j] = replace(d, order=order, points=keep if d.points is not None else None,
                                 corrector_order=corrector_order)
    return out


def compile_plan(
    grid: TimeGrid, decisions: Sequence[StepDecision], extra_buffer: int = 0, ems: EMSGrid | None = None
) -> Plan:
    """Turn per-step decisions into float coefficients (host, float64), validating them against the grid.

    ``ems``: DPM-Solver-v3 tables for steps with ``prediction="ems"``."""
    if not isinstance(grid, TimeGrid):
        raise TypeError(f"`grid` must be a TimeGrid (fewstep.solvers.grids), got {type(grid).__name__}")
    if ems is not None and not isinstance(ems, EMSGrid):
        raise TypeError(f"`ems` must be an EMSGrid or None, got {type(ems).__name__}")
    n = grid.num_steps
    check_int("extra_buffer", extra_buffer, 0)
    decisions = list(decisions)
    if len(decisions) != n:
        raise ValueError(f"need one decision per step: grid has {n} steps, got {len(decisions)} decisions")
    steps: list[CompiledStep] = []
    need = 1
    for i, d in enumerate(decisions):
        if not isinstance(d, StepDecision):
            raise TypeError(f"decisions[{i}] must be a StepDecision, got {type(d).__name__}")
        pts = d.derivative_points
        if pts and max(pts) > i:
            raise ValueError(f"step {i}: order {d.order} needs {max(pts)} previous evaluations, only {i} exist")
        corrector = None
        if i > 0 and decisions[i - 1].corrector != "none":
            prev = decisions[i - 1]
            # UniC: the new point (grid i, offset 0) joins the previous step's derivative points.
            cpts = ([i] + [i - 1 - p for p in prev.derivative_points])[: prev.corrector_points]
            corrector = _transition(
                grid, i - 1, i, prev.prediction, cpts, prev.coefficients, prev.relaxation, base=1,
                pseudo=prev.corrector_pseudo, ems=ems,
            )
            need = max(need, 1 + max(1, *(i - j for j in cpts)))
        if d.corrector != "none" and i == n - 1:
            raise ValueError("the last step cannot have a corrector (there is no evaluation after it)")
        predictor = _transition(
            grid, i, i + 1, d.prediction, [i - p for p in pts], d.coefficients, d.relaxation, 0, d.stochastic,
            d.pseudo, ems,
        )
        need = max(need, 1 + (max(pts) if pts else 0))
        reevaluate = corrector is not None and decisions[i - 1].corrector == "implicit"
        steps.append(CompiledStep(corrector, predictor, reevaluate))
    return Plan(grid, decisions, steps, need + extra_buffer)


@dataclass(frozen=True)
class AnalyticStart:
    """USF's analytical first step at time point ``t_0``: the pair ``(m, (x_0 - alpha m) / sigma)`` stands in for
    the model there (``m``: ``mean``, or 0 for ``zero_x0``), and the plan begins at ``t_1`` with
    ``x_1 = scale * x_0 + offset * m`` (``scale = sigma_1 / sigma_0``, ``offset = alpha_1 - scale * alpha_0``: the
    first-order step from that pair in either prediction form)."""

    alpha: float
    sigma: float
    scale: float
    mean: torch.Tensor | None = None
    offset: float = 0.0

    def shift(self, like: torch.Tensor) -> torch.Tensor | float:
        """``offset * m`` broadcast against a sample ``like`` (0 for ``zero_x0``)."""
        if self.mean is None or self.offset == 0.0:
            return 0.0
        mean = self.mean.to(device=like.device, dtype=like.dtype)
        if like.shape[1:] != mean.shape:  # one sample's shape exactly: a row or a channel would broadcast silently
            raise ValueError(f"the schedule's mean image (average_x0) has shape {tuple(mean.shape)}, which does not "
                             f"match samples of shape {tuple(like.shape)} (it must be one sample's shape, "
                             f"{tuple(like.shape[1:])})")
        return self.offset * mean

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """The sample at ``t_1`` from the initial noise ``x_0`` at ``t_0``."""
        return noise * self.scale + self.shift(noise)


def check_analytic_first_decision(d: StepDecision) -> None:
    """The decision of an analytical first step must make it exactly ``x_1 = (sigma_1 / sigma_0) x_0``: a
    first-order data or noise ODE step (an EMS or stochastic step would not)."""
    if d.order != 1 or d.prediction == "ems" or d.stochastic:
        raise ValueError(
            "the analytical first step (afs) must be a first-order 'data' or 'noise' ODE step (x_1 = sigma_1/sigma_0 "
            f"x_0), got prediction={d.prediction!r}, order={d.order}, stochastic={d.stochastic}"
        )


def with_analytic_first_step(plan: Plan, mean: torch.Tensor | None = None) -> Plan:
    """The plan that skips the model call at ``plan``'s first point: its steps and grid from point 1 on, with
    the analytic evaluation ``x0 = 0, eps = x_0 / sigma_0`` buffered first (``AnalyticStart``).

    Step 0 of ``plan`` is the analytic step itself; it must be a first-order data/noise ODE step (so that it
    is exactly ``x_1 = (sigma_1 / sigma_0) x_0``), and the plan needs at least one model evaluation after it.
    Derivative points and correctors of the later steps refer to buffer offsets, so they keep their meaning.
    ``mean``: the data's mean image for ``average_x0`` (shape of one sample, without the batch), ``None`` for
    ``zero_x0``.
    """
    if plan.num_steps < 2:
        raise ValueError("an analytical first step needs at least one model evaluation after it (2+ time points)")
    if plan.analytic_start is not None:
        raise ValueError("this plan already starts with an analytical first step")
    check_analytic_first_decision(plan.decisions[0])
    if plan.momentum is not None:
        raise ValueError("an analytical first step cannot be combined with momentum")
    g = plan.grid
    grid = TimeGrid(g.timesteps[1:], g.alphas[1:], g.sigmas[1:])
    if mean is not None:
        if not isinstance(mean, torch.Tensor) or mean.dim() == 0 or not bool(torch.isfinite(mean).all()):
            raise ValueError("`mean` (average_x0) must be a finite tensor shaped like one sample")
        mean = mean.detach().to(torch.float64)
    scale = float(g.sigmas[1] / g.sigmas[0])
    offset = float(g.alphas[1] - scale * g.alphas[0]) if mean is not None else 0.0
    start = AnalyticStart(float(g.alphas[0]), float(g.sigmas[0]), scale, mean, offset)
    return Plan(grid, plan.decisions[1:], plan.steps[1:], plan.buffer_size, dict(plan.extra), None, start)


@dataclass
class Evaluation:
    """One buffered model evaluation: where it was taken and its ``(x0, eps)`` pair.

    ``history``: the pair that later steps read for this evaluation as a *past* derivative point, when it differs
    from the pair the step itself used (CFG++ with ``history="unconditional"``: the guided pair drives its own step,
    the unconditional one is remembered); ``None``: the same pair."""

    x_eval: torch.Tensor
    x0: torch.Tensor
    eps: torch.Tensor
    history: tuple[torch.Tensor, torch.Tensor] | None = None

    def field(self, kind: str, past: bool = False) -> torch.Tensor:
        """``x0`` (``kind="data"``) or ``eps``; ``past``: as a past derivative point (the ``history`` pair)."""
        x0, eps = self.history if (past and self.history is not None) else (self.x0, self.eps)
        return x0 if kind == "data" else eps


def _is_past(offset: int, base: int) -> bool:
    """Whether buffer ``offset`` is a past derivative point of a transition based at ``base``: neither its base
    nor the newest evaluation (those read the pair their own step used)."""
    return offset != 0 and offset != base


def apply_transition(
    tr: Transition, x_start: torch.Tensor, buffer: Sequence[Evaluation], noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Evaluate a compiled transition; ``buffer[-1 - k]`` is offset ``k``. Tensor arithmetic only.

    ``noise`` (standard normal, shape of the sample) is required by stochastic transitions (``tr.noise != 0``).
    """
    if isinstance(tr, EMSTransition):
        return tr.apply(x_start, buffer)
    base = buffer[-1 - tr.base]
    out = tr.alpha_t * base.x0 + tr.sigma_t * base.eps
    if tr.lin != 0.0 and x_start is not base.x_eval:  # (the same tensor: the term is exactly zero)
        out = out + tr.lin * (x_start - base.x_eval)
    if tr.weights:
        f_base = base.field(tr.kind)
        total = 0.0
        for offset, w in tr.weights:
            out = out + w * buffer[-1 - offset].field(tr.kind, _is_past(offset, tr.base))
            total += w
        out = out - total * f_base
    if tr.noise != 0.0:
        if noise is None:
            raise ValueError("this step is stochastic (SDE): pass `noise`, a standard normal tensor like the sample")
        out = out + tr.noise * noise
    return out


Hook = Callable[["EngineState", int], None]


class EngineState:
    """Mutable sampling state: the evaluation buffer and the sample before the last predictor.

    ``hooks`` run after the corrector and before the predictor of each step (``hook(state, i)``); they may
    rewrite ``state.buffer`` (DC-Solver) or ``state.sample`` (FlowChef). Create a new state per image batch.
    With ``plan.momentum``, the transition that defines the trajectory (the corrector where there is one,
    else the predictor) is wrapped by heavy-ball/GHVB momentum; a predictor that will be corrected only
    provides the next evaluation point and runs plain.
    """

    def __init__(self, plan: Plan, hooks: Sequence[Hook] = ()):
        self.plan = plan
        self.buffer: list[Evaluation] = []
        self.last_sample: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None
        self.hooks = list(hooks)
        self.momentum = MomentumState() if plan.momentum is not None else None

    def _momentum(self, transition: int, x_start: torch.Tensor, x_base: torch.Tensor) -> torch.Tensor:
        if self.momentum is None:
            return x_base
        mstep = self.plan.momentum[transition]
        return x_base if mstep is None else self.momentum.apply(mstep, x_start, x_base)

    def advance(
        self, i: int, x_eval: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None = None,
        history: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Consume the evaluation at grid point ``i`` (taken at ``x_eval``) and return the sample at ``i+1`` -- or,
        when step ``i`` corrects implicitly, the corrected sample at ``i``, where the model is called again
        (``reevaluated``).

        ``noise``: fresh standard normal noise for a stochastic step (ignored by ODE steps). ``history``: the pair
        later steps read for this evaluation as a past derivative point (``Evaluation.history``; default the same
        pair)."""
        step = self.plan.steps[i]
        start = self.plan.analytic_start
        if start is not None and i == 0:  # the analytic evaluation at t_0, then this one (at t_1)
            x_first = (x_eval - start.shift(x_eval)) / start.scale
            x0_first = torch.zeros_like(x_eval) + (0.0 if start.mean is None else start.mean.to(x_eval))
            self.buffer = [Evaluation(x_first, x0_first, (x_first - start.alpha * x0_first) / start.sigma)]
            self.last_sample = x_first
        self.buffer.append(Evaluation(x_eval, x0, eps, history))
        if len(self.buffer) > self.plan.buffer_size:
            del self.buffer[0]
        x = x_eval
        if step.corrector is not None and self.last_sample is not None:
            x = apply_transition(step.corrector, self.last_sample, self.buffer)
            x = self._momentum(i - 1, self.last_sample, x)
            if step.reevaluate:  # implicit corrector: the model is called at x next (``reevaluated``)
                return x
        return self._predict(i, x, noise)

    def reevaluated(
        self, i: int, x_eval: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None = None,
        history: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Consume the second evaluation at grid point ``i`` (an implicit corrector's, taken at the corrected
        ``x_eval`` that ``advance(i, ...)`` returned): it replaces the predicted evaluation in the buffer, then the
        predictor runs from ``x_eval``. Returns the sample at ``i+1``."""
        if not self.plan.steps[i].reevaluate:
            raise ValueError(f"step {i} has no implicit corrector: there is no second evaluation to consume")
        self.buffer[-1] = Evaluation(x_eval, x0, eps, history)
        return self._predict(i, x_eval, noise)

    def call(
        self, k: int, x_eval: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None = None,
        history: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Consume model call ``k`` of ``plan.calls`` and return where the model is called next (or the result).

        A run that begins (img2img: ``set_begin_index``) at a step with an implicit corrector has no earlier step
        to correct: at the step's first call the sample itself is the corrected point, buffered and returned so that
        the second call evaluates the model there; begun at the second call, that evaluation is the step's only one
        and its predictor runs (a plain first step). (After an analytical first step the analytic point is the
        earlier step: the corrector runs from it.)"""
        i, again = self.plan.calls[k]
        if self.last_sample is None and self.plan.analytic_start is None and self.plan.steps[i].reevaluate:
            if again:
                return self.advance(i, x_eval, x0, eps, noise, history)
            self.buffer.append(Evaluation(x_eval, x0, eps, history))
            return x_eval
        if again:
            return self.reevaluated(i, x_eval, x0, eps, noise, history)
        return self.advance(i, x_eval, x0, eps, noise, history)

    def _predict(self, i: int, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        self.sample = x
        for hook in self.hooks:
            hook(self, i)
        x = self.sample
        self.last_sample = x
        x_next = apply_transition(self.plan.steps[i].predictor, x, self.buffer, noise)
        if self.plan.decisions[i].corrector == "none":
            x_next = self._momentum(i, x, x_next)
        return x_next


PairFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _check_pair(out: Any, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pair_fn``'s result must be two tensors shaped like the sample (checked on metadata only: no sync)."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(v, torch.Tensor) for v in out)):
        raise TypeError(f"`pair_fn` must return a pair of tensors (x0, eps); at grid point {i} it returned "
                        f"{type(out).__name__}")
    for name, v in zip(("x0", "eps"), out):
        if v.shape != x.shape:
            raise ValueError(f"`pair_fn` returned {name} of shape {tuple(v.shape)} at grid point {i}; the sample has "
                             f"shape {tuple(x.shape)}")
    return out[0], out[1]


def sample_loop(
    pair_fn: PairFn,
    x_start: torch.Tensor,
    plan: Plan,
    hooks: Sequence[Hook] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Functional sampler: ``pair_fn(x, i) -> (x0, eps)`` evaluates the model at grid point ``i`` (once per entry
    of ``plan.calls``: twice at a point whose step has an implicit corrector).

    ``x_start`` is the sample at the plan's first grid point; a plan with an analytical first step starts one
    point later: pass ``plan.analytic_start.start(noise)``.

    As the schedulers' ``step``: ``pair_fn`` sees samples in ``x_start``'s dtype and every update is computed in
    ``compute_dtype`` of it (float32 for half precision), the state kept in it between steps (as a scheduler keeps
    the float32 result of a half-precision step) and rounded to ``x_start``'s dtype at the end; stochastic steps
    draw standard normal noise from ``generator`` (on the sample's device) in float32 at every stochastic step, so
    one seeded generator gives the scheduler's trajectory."""
    if not isinstance(plan, Plan):
        raise TypeError(f"`plan` must be a Plan (see compile_plan), got {type(plan).__name__}")
    if not isinstance(x_start, torch.Tensor):
        raise TypeError(f"`x_start` must be a torch.Tensor, got {type(x_start).__name__}")
    if not x_start.is_floating_point():
        raise TypeError(f"`x_start` must be a floating tensor, got dtype {x_start.dtype}")
    dtype = compute_dtype(x_start.dtype)
    state = EngineState(plan, hooks)
    x = x_start.to(dtype)
    for k, (i, again) in enumerate(plan.calls):
        seen = x.to(x_start.dtype)
        x0, eps = _check_pair(pair_fn(seen, i), seen, i)
        noise = None
        stochastic = plan.decisions[i].stochastic or plan.steps[i].predictor.noise != 0.0  # (DDIM eta plans)
        if stochastic and (again or not plan.steps[i].reevaluate):
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(dtype)
        x = state.call(k, x, x0.to(dtype), eps.to(dtype), noise)
    return x.to(x_start.dtype)
