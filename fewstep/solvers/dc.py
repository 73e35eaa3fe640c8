"""DC-Solver: dynamic compensation of the buffered model output (Zhao, Wang, Zhou & Lu, ECCV 2024).

A predictor-corrector sampler (UniPC) moves the sample *after* the model was evaluated there, so the
buffered output ``m_i`` that the next predictor uses belongs to the uncorrected point. DC-Solver
(sec. 3.2 of the paper) replaces it, before the predictor of step ``i``, by a Lagrange interpolation of
the last ``K+1`` buffered outputs at a shifted time::

    tau_i  = v_{i-1} + rho_i (v_i - v_{i-1})
    m_hat_i = sum_{k=0..K} m_{i-k} prod_{l != k} (tau_i - v_{i-l}) / (v_{i-k} - v_{i-l})

``v`` is the interpolation variable: the model timestep ``t`` (the paper's and the reference code's
choice), ``lambda`` (half log-SNR) or ``sigma``. ``rho_i = 1`` gives ``m_hat_i = m_i`` (identity);
``rho_i > 1`` extrapolates past ``t_i``. The compensated value *overwrites* the buffer entry, so the next
corrector and later interpolations see it too (as in the paper). The same rewrite, with ratios searched
for it, is the predictor-only plug-in for DDIM and DPM-Solver++ (sec. 3.4).

Implementation. In normalised coordinates ``u = (v - v_{i-1}) / (v_i - v_{i-1})`` the nodes are
``u_0 = 1`` (newest), ``u_1 = 0`` and ``u_k`` (older, negative) and ``tau = rho`` itself, so the weights
``l_k(rho) = prod_{l != k} (rho - u_l) / (u_k - u_l)`` are polynomials of degree ``K`` in ``rho``:
exactly ``(1, 0, ..., 0)`` at ``rho = 1``. :func:`lagrange_weights` uses arithmetic only, so the same code
gives host floats for the scheduler (computed once in ``set_timesteps``) and differentiable torch scalars
for the ratio search. The hook (:class:`DynamicCompensation`) then does tensor arithmetic only.

The buffer holds ``(x_eval, x0, eps)`` pairs. Data-prediction steps interpolate ``x0``; noise-prediction
steps interpolate ``eps``. The other member is shifted so that ``alpha_i x0 + sigma_i eps`` is unchanged
(``eps <- eps - (alpha_i/sigma_i) dx0`` resp. ``x0 <- x0 - (sigma_i/alpha_i) deps``): for a consistent pair
this is exactly "replace ``m_i``" in the solver's usual form ``x_t = (sigma_t/sigma_s) x_s + alpha_t (1 -
e^{-h}) m_s + ...``, and it leaves a CFG++-style inconsistency untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._checks import check_int
from .engine import EngineState, Evaluation, Plan, StepDecision, compile_plan
from .grids import TimeGrid

__all__ = [
    "DC_VARIABLES",
    "DCStep",
    "DynamicCompensation",
    "lagrange_weights",
    "interpolation_values",
    "normalized_nodes",
    "dc_step",
    "compile_dc",
    "compile_dc_plan",
    "check_ratios",
]

#: interpolation variables: model timestep (paper), half log-SNR, noise level sigma_t.
DC_VARIABLES = ("t", "lambda", "sigma")


def lagrange_weights(nodes: Sequence[float], rho: Any) -> list[Any]:
    """Lagrange basis ``l_k(rho) = prod_{l != k} (rho - u_l) / (u_k - u_l)`` at the nodes ``u_k``.

    DC-Solver eq. (interpolation of the buffered outputs, sec. 3.2). ``nodes`` are host floats (distinct,
    finite); ``rho`` may be a float or a (differentiable) torch scalar -- only arithmetic is used, so the
    result has ``rho``'s type. ``sum_k l_k(rho) = 1`` and ``sum_k l_k(rho) p(u_k) = p(rho)`` for every
    polynomial ``p`` of degree ``<= len(nodes) - 1``.
    """
    u = [float(v) for v in nodes]
    if len(u) < 1:
        raise ValueError("`nodes` must hold at least one interpolation node, got none")
    if not all(math.isfinite(v) for v in u):
        raise ValueError(f"`nodes` must be finite, got {u}")
    if len(set(u)) != len(u):
        raise ValueError(f"`nodes` must be distinct, got {u}")
    if isinstance(rho, (int, float, np.floating, np.integer)) and not math.isfinite(float(rho)):
        raise ValueError(f"`rho` must be finite, got {rho!r}")
    weights = []
    for k, uk in enumerate(u):
        w: Any = 1.0
        for m, um in enumerate(u):
            if m != k:
                w = w * ((rho - um) / (uk - um))
        weights.append(w)
    return weights


def interpolation_values(grid: TimeGrid, variable: str = "t") -> np.ndarray:
    """The interpolation variable at the grid's evaluation points: ``t`` (model timestep), ``lambda`` or ``sigma``."""
    if variable not in DC_VARIABLES:
        raise ValueError(f"`variable` must be one of {list(DC_VARIABLES)}, got {variable!r}")
    n = grid.num_steps
    if variable == "t":
        t = np.asarray(grid.timesteps[:n], dtype=np.float64)
        if np.any(np.diff(t) == 0):
            repeated = sorted({float(v) for v in t[1:][np.diff(t) == 0]})
            raise ValueError(
                f"DC-Solver's interpolation variable 't' repeats on this grid (model timesteps {repeated} are used "
                "twice: a Karras grid rounds its many low noise levels to the same integer step); use "
                "dc_variable='lambda', which stays distinct"
            )
        return t
    if variable == "lambda":
        return np.asarray(grid.lambdas[:n], dtype=np.float64)
    return np.asarray(grid.sigmas[:n], dtype=np.float64)


def normalized_nodes(values: Sequence[float], i: int, order: int) -> list[float]:
    """Nodes ``u_k = (v_{i-k} - v_{i-1}) / (v_i - v_{i-1})`` for ``k = 0..order`` (``u_0 = 1``, ``u_1 = 0`` exactly)."""
    v = np.asarray(values, dtype=np.float64)
    check_int("order", order, 1, what="the DC interpolation order K")
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < v.size:
        raise ValueError(f"`i` must be a step index in [0, {v.size - 1}], got {i!r}")
    if i < order:
        raise ValueError(
            f"step {i}: interpolation order K={order} needs K+1={order + 1} buffered outputs, only {i + 1} exist "
            f"(set rho_{i} = 1 or lower the order)"
        )
    span = v[i] - v[i - 1]
    if span == 0 or not math.isfinite(span):
        raise ValueError(f"step {i}: interpolation variable does not change between points {i - 1} and {i}")
    nodes = [1.0, 0.0] + [float((v[i - k] - v[i - 1]) / span) for k in range(2, order + 1)]
    return nodes


@dataclass(frozen=True)
class DCStep:
    """Compiled compensation of one step: ``F_hat = sum_k weights[k] * F_{i-k}`` (``F = x0`` or ``eps``).

    ``shift`` converts the change of ``F`` into the change of the other member of the pair
    (``alpha_i/sigma_i`` for data prediction, ``sigma_i/alpha_i`` for noise prediction).
    ``weights`` are host floats in the scheduler and torch scalars in the ratio search.
    """

    kind: str
    weights: tuple[Any, ...]
    shift: float

    @property
    def order(self) -> int:
        return len(self.weights) - 1


def dc_step(grid: TimeGrid, decision: StepDecision, i: int, rho: Any, order: int = 2, variable: str = "t") -> DCStep:
    """The compensation of step ``i`` for ratio ``rho`` (float, or a torch scalar for the search)."""
    if not isinstance(decision, StepDecision):
        raise TypeError(f"`decision` must be a StepDecision, got {type(decision).__name__}")
    nodes = normalized_nodes(interpolation_values(grid, variable), i, order)
    weights = tuple(lagrange_weights(nodes, rho))
    a, s = float(grid.alphas[i]), float(grid.sigmas[i])
    shift = a / s if decision.prediction == "data" else s / a
    if not math.isfinite(shift):
        raise ValueError(f"step {i}: cannot compensate at alpha={a}, sigma={s} (the pair conversion diverges)")
    return DCStep(decision.prediction, weights, shift)


def check_ratios(ratios: Any, num_steps: int, order: int = 2, name: str = "ratios") -> list[float]:
    """Validate a ratio list: one finite float ``> 0`` per step, ``rho_i = 1`` where fewer than ``K+1`` outputs
    exist.

    ``rho_i <= 0`` puts the interpolation time ``tau_i`` at or before the previous point ``v_{i-1}``: the newest
    output would be replaced by (an extrapolation beyond) an older one, the opposite of compensating the corrector's
    move (the searched ratios start at 1 and stay near it; CPR predictions <= 0 are refused for the same reason).
    Bools (``True`` would be taken as 1.0) are refused. No upper bound: the search is unconstrained (AdamW from 1).
    ``name``: the argument the messages name (e.g. the scheduler option ``dc_ratios``)."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, (Sequence, np.ndarray, torch.Tensor)):
        raise ValueError(f"`{name}` must be a list of floats (one per step), got {type(ratios).__name__}")
    raw = ratios.tolist() if hasattr(ratios, "tolist") else list(ratios)
    flags = [i for i, r in enumerate(raw) if isinstance(r, (bool, np.bool_))]
    if flags:  # (a bool array's `tolist` holds Python bools too)
        i = flags[0]
        raise ValueError(f"`{name}`[{i}] is the bool {raw[i]!r}; ratios must be numbers (one float per step)")
    values = [float(r) for r in raw]
    if len(values) != num_steps:
        raise ValueError(
            f"`{name}` has {len(values)} entries but the sampler runs {num_steps} steps; need one per step"
        )
    bad = [r for r in values if not math.isfinite(r)]
    if bad:
        raise ValueError(f"`{name}` must be finite, got {values}")
    nonpositive = [(i, r) for i, r in enumerate(values) if r <= 0]
    if nonpositive:
        i, r = nonpositive[0]
        raise ValueError(
            f"`{name}`[{i}] = {r!r}: ratios must be > 0 (rho <= 0 puts the compensation time tau_i at or before the "
            f"previous step's time, replacing the newest model output by an older one); got {values}"
        )
    early = [(i, r) for i, r in enumerate(values[:order]) if r != 1.0]
    if early:
        i, r = early[0]
        raise ValueError(
            f"`{name}`[{i}] = {r}: interpolation order K={order} needs K+1={order + 1} buffered outputs, step {i} has "
            f"only {i + 1}; the first {order} ratios must be 1"
        )
    return values


def compile_dc(plan: Plan, ratios: Sequence[float], order: int = 2, variable: str = "t", start: int = 0
               ) -> list[DCStep | None]:
    """Host-side (float64) compensation table for a plan: ``None`` where no compensation applies (``i < start + K``:
    the buffer holds fewer than ``K + 1`` outputs; ``start`` is the first step of the run, after 0 in img2img)."""
    values = check_ratios(ratios, plan.num_steps, order)
    check_int("start", start, 0, max(plan.num_steps - 1, 0), numpy_ok=False)
    if plan.buffer_size < order + 1:
        raise ValueError(
            f"the plan buffers {plan.buffer_size} outputs but interpolation order K={order} needs {order + 1}; "
            "compile it with `compile_dc_plan`"
        )
    table: list[DCStep | None] = []
    for i, rho in enumerate(values):
        table.append(None if i < start + order else dc_step(plan.grid, plan.decisions[i], i, rho, order, variable))
    return table


def compile_dc_plan(grid: TimeGrid, decisions: Sequence[StepDecision], order: int = 2) -> Plan:
    """``compile_plan`` with a buffer large enough for ``K+1`` interpolation points."""
    check_int("order", order, 1, 3, what="the DC interpolation order K")
    plan = compile_plan(grid, decisions)
    if plan.buffer_size < order + 1:
        plan = compile_plan(grid, decisions, extra_buffer=order + 1 - plan.buffer_size)
    plan.extra["dc_order"] = int(order)
    return plan


class DynamicCompensation:
    """Engine hook (``hook(state, i)``, run between corrector and predictor) that rewrites the newest output.

    ``table[i]`` is a :class:`DCStep` or ``None``; ``table`` may be edited between steps (the ratio search
    fixes one step at a time). Tensor arithmetic only: no host sync, no branch on tensor values.
    """

    def __init__(self, table: Sequence[DCStep | None]):
        self.table = list(table)

    def __call__(self, state: EngineState, i: int) -> None:
        entry = self.table[i] if i < len(self.table) else None
        if entry is None:
            return
        buffer = state.buffer
        if len(buffer) < entry.order + 1:
            raise ValueError(
                f"step {i}: dynamic compensation of order K={entry.order} needs {entry.order + 1} buffered outputs, "
                f"the buffer holds {len(buffer)}"
            )
        newest = buffer[-1]
        field = entry.kind
        mixed = entry.weights[0] * newest.field(field)
        for k in range(1, entry.order + 1):
            mixed = mixed + entry.weights[k] * buffer[-1 - k].field(field)
        delta = mixed - newest.field(field)
        if field == "data":
            buffer[-1] = Evaluation(newest.x_eval, mixed, newest.eps - entry.shift * delta)
        else:
            buffer[-1] = Evaluation(newest.x_eval, newest.x0 - entry.shift * delta, mixed)
