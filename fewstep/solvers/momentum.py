"""Heavy-ball (HB) and generalized heavy-ball (GHVB) momentum around the engine's update.

Wizadwongsa et al. (2024), "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts".

**Where momentum lives.** Every transition ``s -> t`` of the engine is an explicit Euler step in a
rescaled space: ``y = c x`` against a variable ``u`` with

* ``space="noise"`` (DDIM space): ``c = 1/alpha``, ``u = sigma/alpha`` -- DDIM is ``dy/du = eps``;
* ``space="data"``: ``c = 1/sigma``, ``u = alpha/sigma = e^lambda`` -- DPM-Solver++ is ``dy/du = x0``.

So whatever the base method computes (a DDIM step, a DPM-Solver++ 2M step, a UniC-corrected step, a
CFG++ pair), it has a *direction* ``d = (c_t x_t^base - c_s x_s) / (u_t - u_s)`` and the update is
``y_t = y_s + (u_t - u_s) d``. Momentum replaces ``d`` by a combination of past directions:

* ``mode="hb"`` (paper eq. 11, Polyak heavy ball on a multistep method): ``e_n = sum_j b_j d_{n-j}``
  with Adams-Bashforth weights ``b`` (PLMS; ``[1]`` over a method that is already multistep), then
  ``v_n = (1 - beta) v_{n-1} + beta e_n`` and the step uses ``v_n`` -- or, Nesterov,
  ``(1 - beta) v_n + beta e_n``. First order for ``beta < 1``; larger stability region.
* ``mode="ghvb"`` (paper eq. 13): ``v_n = (1 - beta) v_{n-1} + beta d_n`` first, then the step uses
  ``sum_j g_j(beta) v_{n-j}`` with GHVB weights ``g`` -- a k-step method that keeps order k.

``v`` starts at the first momentum step's own value (``v_0 = e_0``), so the first step equals the base
step. ``beta = 1`` reproduces the base method (PLMS-k for both modes over DDIM). Coefficients are
plain floats fixed in ``set_timesteps``; :class:`MomentumState` does tensor arithmetic only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .._checks import check_int, check_number
from .grids import TimeGrid

__all__ = [
    "MODES",
    "SPACES",
    "MAX_ORDER",
    "adams_bashforth_coefficients",
    "ghvb_coefficients",
    "split_fractional_order",
    "check_beta",
    "MomentumStep",
    "compile_momentum",
    "MomentumState",
]

MODES = ("hb", "ghvb")
SPACES = ("noise", "data")
MAX_ORDER = 5

# Adams-Bashforth weights (newest first) for constant steps: integral of the Lagrange basis over one step.
_AB = {
    1: (Fraction(1),),
    2: (Fraction(3, 2), Fraction(-1, 2)),
    3: (Fraction(23, 12), Fraction(-16, 12), Fraction(5, 12)),
    4: (Fraction(55, 24), Fraction(-59, 24), Fraction(37, 24), Fraction(-9, 24)),
    5: (Fraction(1901, 720), Fraction(-2774, 720), Fraction(2616, 720), Fraction(-1274, 720), Fraction(251, 720)),
}

# GHVB weights (paper, Table/eq. for k = 1..5), as (constant, beta-slope) pairs over a common denominator:
# g_j(beta) = (a_j + b_j beta) / (den * beta). Each row sums to 1 and beta = 1 gives Adams-Bashforth.
_GHVB = {
    1: (1, ((0, 1),)),
    2: (2, ((2, 1), (-2, 1))),
    3: (12, ((18, 5), (-24, 8), (6, -1))),
    4: (24, ((46, 9), (-78, 19), (42, -5), (-10, 1))),
    5: (720, ((1650, 251), (-3420, 646), (2880, -264), (-1380, 106), (270, -19))),
}


def _check_order(order: int, name: str = "order", upper: int = MAX_ORDER) -> int:
    check_int(name, order, 1, upper, numpy_ok=False)
    return order


def check_beta(beta: float, name: str = "beta") -> float:
    """Validate a momentum coefficient: a real number in ``(0, 1]``."""
    return check_number(name, beta, 0.0, 1.0, low_open=True)


def adams_bashforth_coefficients(order: int) -> tuple[float, ...]:
    """Weights ``b_0..b_{k-1}`` (newest first) of the ``k``-step Adams-Bashforth method (PLMS-k)."""
    return tuple(float(c) for c in _AB[_check_order(order)])


def ghvb_coefficients(order: int, beta: float) -> tuple[float, ...]:
    """GHVB-k weights ``g_j(beta)`` on the velocity history (newest first); ``beta = 1`` gives AB-k."""
    k = _check_order(order)
    beta = check_beta(beta)
    den, rows = _GHVB[k]
    return tuple((a + b * beta) / (den * beta) for a, b in rows)


def split_fractional_order(order: float) -> tuple[int, float]:
    """The paper's fractional order ``r``: ``k = floor(r) + 1, beta = r - floor(r)``, or ``(r, 1)`` if integral.

    ``3.8 -> (4, 0.8)`` (fourth-order base, beta 0.8); ``1.5 -> (2, 0.5)``; ``4 -> (4, 1.0)``.
    """
    r = check_number("fractional order", order, 0.0, MAX_ORDER, low_open=True,
                     allowed=f"(0, {MAX_ORDER}] (k = floor(r) + 1 <= {MAX_ORDER})")
    whole = math.floor(r)
    frac = round(r - whole, 12)  # 2.9 -> 0.9, not 0.8999999999999999
    if frac < 1e-9:
        return int(whole), 1.0
    return int(whole) + 1, frac


@dataclass(frozen=True)
class MomentumStep:
    """Coefficients of momentum on one trajectory transition ``s -> t`` (see the module docstring).

    ``c_s, c_t``: space scales; ``du = u_t - u_s``; ``weights``: AB (``hb``) or GHVB (``ghvb``) weights for
    the history, newest first; ``first``: this is the first momentum step (``v`` is initialised).
    """

    mode: str
    c_s: float
    c_t: float
    du: float
    beta: float
    weights: tuple[float, ...]
    nesterov: bool
    first: bool


def _space_scales(grid: TimeGrid, i: int, space: str) -> tuple[float, float]:
    """``(c, u)`` of grid point ``i``: ``(1/alpha, sigma/alpha)`` or ``(1/sigma, alpha/sigma)``."""
    a, s = float(grid.alphas[i]), float(grid.sigmas[i])
    if space == "noise":
        return (1.0 / a, s / a) if a > 0 else (math.inf, math.inf)
    return (1.0 / s, a / s) if s > 0 else (math.inf, math.inf)


def compile_momentum(
    grid: TimeGrid,
    mode: str,
    order: int,
    beta: float,
    space: str = "noise",
    active: list[bool] | None = None,
    nesterov: bool = False,
    start: int = 0,
) -> list[MomentumStep | None]:
    """One :class:`MomentumStep` (or ``None`` = plain base step) per grid transition.

    ``order``: Adams-Bashforth order of the direction history for ``hb`` (1 over a method that is
    multistep already) or the GHVB order for ``ghvb``; both start at order 1 and grow with the history
    (the paper's warm-up). ``active[i]`` says whether transition ``i`` carries momentum; inactive steps
    neither use nor feed the history, and neither does a transition of zero length (it stands still).
    ``start``: the first transition a run takes (img2img begins part-way);
    the ones before it never run, and the history (and so the warm-up) starts there.
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {list(MODES)}, got {mode!r}")
    if space not in SPACES:
        raise ValueError(f"`space` must be one of {list(SPACES)}, got {space!r}")
    _check_order(order)
    beta = check_beta(beta)
    if not isinstance(nesterov, bool):
        raise ValueError(f"`nesterov` must be a bool, got {nesterov!r}")
    if nesterov and mode != "hb":
        raise ValueError("`nesterov=True` is defined for heavy ball (mode='hb') only")
    n = grid.num_steps
    check_int("start", start, 0, max(n - 1, 0), numpy_ok=False)
    active = [True] * n if active is None else [bool(a) for a in active]
    if len(active) != n:
        raise ValueError(f"`active` needs one flag per step ({n}), got {len(active)}")
    active = [a and i >= start for i, a in enumerate(active)]
    steps: list[MomentumStep | None] = []
    history = 0
    for i in range(n):
        if not active[i]:
            steps.append(None)
            continue
        c_s, u_s = _space_scales(grid, i, space)
        c_t, u_t = _space_scales(grid, i + 1, space)
        du = u_t - u_s
        if du == 0.0 and all(math.isfinite(v) for v in (c_s, c_t)) and grid.lambdas[i + 1] == grid.lambdas[i]:
            steps.append(None)  # a step of zero length (a Karras grid's sigma_min end): the base step stands still
            continue
        if not all(math.isfinite(v) for v in (c_s, c_t, du)) or du == 0.0:
            raise ValueError(
                f"step {i}: momentum in {space!r} space is undefined at this grid point (alpha or sigma is 0 or "
                "the step has zero length); leave this step without momentum"
            )
        history += 1
        k = min(order, history)
        weights = adams_bashforth_coefficients(k) if mode == "hb" else ghvb_coefficients(k, beta)
        steps.append(MomentumStep(mode, c_s, c_t, du, beta, weights, nesterov, history == 1))
    return steps


class MomentumState:
    """The per-run momentum state: velocity ``v`` and the direction (HB) or velocity (GHVB) history.

    Create a new one for each sampling run (schedulers do so in ``set_timesteps``): state carried over
    from a previous image would bias the next one.
    """

    def __init__(self, max_history: int = MAX_ORDER) -> None:
        self.max_history = max_history
        self.velocity: torch.Tensor | None = None
        self.history: list[torch.Tensor] = []

    def _push(self, value: torch.Tensor) -> None:
        self.history.append(value)
        if len(self.history) > self.max_history:
            del self.history[0]

    def _combine(self, weights: tuple[float, ...]) -> torch.Tensor:
        out = weights[0] * self.history[-1]
        for j, w in enumerate(weights[1:], start=1):
            out = out + w * self.history[-1 - j]
        return out

    def _ghvb_correction(self, weights: tuple[float, ...], beta: float, increment: torch.Tensor) -> torch.Tensor:
        """GHVB's ``used - d_n`` from the velocity increments ``D_m = (v_m - v_{m-1}) / beta = d_m - v_{m-1}``
        (newest last in ``history``), with no division by ``beta``.

        ``used = sum_j g_j v_{n-j}`` with ``sum_j g_j = 1`` is ``v_n - sum_{j>=1} (g_j beta) (D_n + ... +
        D_{n-j+1})``, and ``v_n - d_n = -(1 - beta) D_n``. The weights ``g_j = (a_j + b_j beta) / (den beta)``
        grow like ``1/beta`` while the velocities they combine differ by ``O(beta)``: summed directly, float32
        lost everything below ``beta ~ 1e-5`` (11 units off PLMS at ``beta = 1e-7``); ``g_j beta`` stays bounded."""
        out = -(1.0 - beta) * increment
        partial = None
        for j, w in enumerate(weights[1:], start=1):
            partial = self.history[-j] if partial is None else partial + self.history[-j]
            out = out - (w * beta) * partial
        return out

    def apply(self, step: MomentumStep, x_start: torch.Tensor, x_base: torch.Tensor) -> torch.Tensor:
        """Replace the base result ``x_base`` of the transition from ``x_start`` by the momentum step."""
        y_s = step.c_s * x_start
        direction = (step.c_t * x_base - y_s) / step.du
        beta = step.beta
        if step.mode == "hb":
            self._push(direction)
            combined = self._combine(step.weights)
            if step.first or self.velocity is None:
                self.velocity = combined
            else:
                self.velocity = (1.0 - beta) * self.velocity + beta * combined
            used = (1.0 - beta) * self.velocity + beta * combined if step.nesterov else self.velocity
        else:  # GHVB, written in velocity increments (see _ghvb_correction)
            if step.first or self.velocity is None:
                self.velocity = direction
                return x_base  # v_0 = d_0: the base step
            increment = direction - self.velocity  # (v_n - v_{n-1}) / beta, exact without dividing by beta
            self.velocity = self.velocity + beta * increment
            self._push(increment)
            return x_base + (step.du / step.c_t) * self._ghvb_correction(step.weights, beta, increment)
        # = (y_s + du * used) / c_t, written as a correction of x_base: on a flow grid's first point c_s ~ 1e6, and
        # the sum y_s + du * used cancels catastrophically in float32 (0.5% off)
        return x_base + (step.du / step.c_t) * (used - direction)
