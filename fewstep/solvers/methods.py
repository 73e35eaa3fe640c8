"""Classic solvers as fixed schedules of engine decisions.

* DDIM (Song et al. 2021, eta = 0): order 1, data prediction -- ``x_t = alpha_t x0 + sigma_t eps``; with
  ``eta > 0`` its stochastic form (``ddim_eta_plan``).
* DPM-Solver(++) multistep (Lu et al. 2022b, Alg. 2): orders 1-3, data (``++``) or noise prediction,
  warm-up with lower orders, and diffusers' ``lower_order_final`` rule for short schedules.
* UniPC (Zhao et al. 2023, Alg. 1-2): UniP-p predictor with ``B(h)`` variants bh1/bh2 plus the UniC
  corrector after every evaluation (except those listed in ``disable_corrector``).

* DPM-Solver-v3 (Zheng et al. 2023, Alg. 1 and sec. 3.4): multistep predictor in the EMS parameterisation
  (``prediction="ems"``), pseudo-order predictor, and a corrector at no extra NFE of the predictor's order
  (pseudo-order ``order + 1`` with ``corrector_pseudo``), optionally only on part of the trajectory.

* PLMS / heavy ball / GHVB (Wizadwongsa et al. 2024): DDIM steps in noise form, wrapped by the
  momentum of ``solvers.momentum``; ``momentum_active`` says which steps of a multistep base carry it.

Each builder returns one ``StepDecision`` per step; ``compile_plan`` turns them into coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

import numpy as np

from .._checks import check_int
from .engine import Plan, StepDecision

__all__ = [
    "ddim_decisions",
    "ddim_eta_plan",
    "dpm_solver_decisions",
    "unipc_decisions",
    "momentum_active",
    "euler_maruyama_decisions",
    "dpm_solver_v3_decisions",
    "DPM_SOLVER_TYPES",
    "UNIPC_TYPES",
]

DPM_SOLVER_TYPES = ("midpoint", "heun", "taylor")
UNIPC_TYPES = ("bh1", "bh2")


def _check_order(order: int, upper: int) -> int:
    check_int("solver_order", order, 1, upper, numpy_ok=False)
    return order


def _check_steps(num_steps: int) -> int:
    return check_int("num_steps", num_steps, 1)


def ddim_decisions(num_steps: int, prediction: str = "data") -> list[StepDecision]:
    """DDIM: every step first order (identical in data and noise form)."""
    return [StepDecision(prediction=prediction, order=1) for _ in range(_check_steps(num_steps))]


def ddim_eta_plan(plan: Plan, eta: float) -> Plan:
    """``plan`` (DDIM's deterministic steps, ``ddim_decisions``) with every predictor made DDIM's stochastic step
    for noise weight ``eta`` in [0, 1] (Song et al. 2021, eq. 12; ``plan`` itself at 0):
    ``x_t = alpha_t x0 + c eps + c / sigma_s (x - x_eval) + sigma_eta z`` with
    ``sigma_eta = eta sigma_t sqrt(1 - e^{-2h})``, ``e^{-h} = (sigma_t / alpha_t) / (sigma_s / alpha_s)`` and
    ``c = sqrt(sigma_t^2 - sigma_eta^2)`` (``eta = 1``: first-order SDE-DPM-Solver++). Host arithmetic on the
    plan's float64 grid; a final step to a clean point (``sigma_t = 0``) stays deterministic."""
    if isinstance(eta, (bool, np.bool_)) or not isinstance(eta, (int, float, np.integer, np.floating)) \
            or not 0.0 <= eta <= 1.0:
        raise ValueError(f"`eta` must be a number in [0, 1] (DDIM's noise weight), got {eta!r}")
    eta = float(eta)
    ddim = StepDecision(prediction="data", order=1)
    if not isinstance(plan, Plan) or any(d not in (ddim, StepDecision(prediction="noise", order=1))
                                         for d in plan.decisions):
        raise ValueError("`plan` must be a DDIM plan (compile_plan(grid, ddim_decisions(n)): first-order, "
                         "deterministic steps without correctors)")
    if eta == 0.0:
        return plan
    g = plan.grid
    steps = []
    for i, compiled in enumerate(plan.steps):
        a_s, s_s, a_t, s_t = (float(v) for v in (g.alphas[i], g.sigmas[i], g.alphas[i + 1], g.sigmas[i + 1]))
        decay = (s_t * a_s) / (a_t * s_s) if s_t > 0 else 0.0
        std = eta * s_t * math.sqrt(max(1.0 - decay * decay, 0.0))
        c = math.sqrt(max(s_t * s_t - std * std, 0.0))
        predictor = replace(compiled.predictor, lin=c / s_s, sigma_t=c, noise=std)
        steps.append(replace(compiled, predictor=predictor))
    return replace(plan, steps=steps, extra=dict(plan.extra))


def dpm_solver_decisions(
    num_steps: int,
    solver_order: int = 2,
    prediction: str = "data",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    final_is_clean: bool = True,
    stochastic: bool = False,
) -> list[StepDecision]:
    """DPM-Solver++ (``prediction="data"``) / DPM-Solver (``"noise"``) multistep, as diffusers orders it.

    Step ``i`` uses order ``min(solver_order, i + 1)``; the last step is first order when it ends at
    sigma = 0, with ``euler_at_final``, or (``lower_order_final``) when there are fewer than 15 steps, in
    which case the second-to-last step is at most second order. ``solver_type``: ``midpoint``/``heun`` are
    diffusers' second-order variants; ``taylor`` uses exact phi-function weights at every order.
    ``stochastic``: the SDE variants (diffusers' ``sde-dpmsolver++`` / ``sde-dpmsolver``, orders 1-2).
    """
    num_steps = _check_steps(num_steps)
    order = _check_order(solver_order, 2 if stochastic else 3)
    if solver_type not in DPM_SOLVER_TYPES:
        raise ValueError(f"`solver_type` must be one of {list(DPM_SOLVER_TYPES)}, got {solver_type!r}")
    rule = {"midpoint": "dpmsolver", "heun": "dpmsolver-heun", "taylor": "taylor"}[solver_type]
    short = lower_order_final and num_steps < 15
    out = []
    for i in range(num_steps):
        p = min(order, i + 1)
        if i == num_steps - 1 and (euler_at_final or short or final_is_clean):
            p = 1
        elif i == num_steps - 2 and short:
            p = min(p, 2)
        out.append(StepDecision(prediction=prediction, order=p, coefficients=rule, stochastic=stochastic))
    return out


def unipc_decisions(
    num_steps: int,
    solver_order: int = 2,
    prediction: str = "data",
    solver_type: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Iterable[int] = (),
    final_is_clean: bool = True,
) -> list[StepDecision]:
    """UniPC: UniP-p predictor (``p = min(solver_order, i + 1)``, lowered near the end with
    ``lower_order_final``) and UniC after each evaluation unless its step is in ``disable_corrector``."""
    num_steps = _check_steps(num_steps)
    order = _check_order(solver_order, 5)
    if solver_type not in UNIPC_TYPES:
        raise ValueError(f"`solver_type` must be one of {list(UNIPC_TYPES)}, got {solver_type!r}")
    if isinstance(disable_corrector, (str, bytes)) or not isinstance(disable_corrector, Iterable):
        raise ValueError("`disable_corrector` must be a list of step indices (integers >= 0), "
                         f"got {disable_corrector!r}")
    disabled = set()
    for d in disable_corrector:
        # indices past the last step are ignored, as diffusers does (a config serves every step count)
        disabled.add(check_int("disable_corrector", d, 0, what="step indices"))
    out = []
    for i in range(num_steps):
        p = min(order, num_steps - i) if lower_order_final else order
        p = min(p, i + 1)
        if i == num_steps - 1 and final_is_clean:
            p = 1
        # diffusers applies the corrector at the entry of step j unless j - 1 is disabled.
        corrector = "unic" if (i < num_steps - 1 and i not in disabled) else "none"
        out.append(StepDecision(prediction=prediction, order=p, coefficients=solver_type, corrector=corrector))
    return out


def momentum_active(decisions: list[StepDecision]) -> list[bool]:
    """Which transitions of an exponential-integrator multistep base carry heavy-ball momentum.

    As in the paper's DPM-Solver++/UniPC variants, momentum wraps the multistep combination only: a
    transition carries it when the update that defines the trajectory uses buffered derivative points --
    every UniC-corrected step, and predictor-only steps of order >= 2. The first-order warm-up step and
    the low-order final steps (``lower_order_final``, the step onto sigma = 0) run plain.
    """
    return [d.corrector == "unic" or d.order >= 2 for d in decisions]


def euler_maruyama_decisions(num_steps: int) -> list[StepDecision]:
    """Euler-Maruyama on the reverse VP SDE: the first-order, non-exponential baseline for SDE samplers."""
    step = StepDecision(prediction="noise", order=1, coefficients="euler-maruyama", stochastic=True)
    return [step] * _check_steps(num_steps)


def dpm_solver_v3_decisions(
    num_steps: int,
    solver_order: int = 2,
    predictor_pseudo: bool = False,
    use_corrector: bool = True,
    corrector_pseudo: bool = True,
    lower_order_final: bool = True,
    corrector_at: Iterable[bool] | None = None,
    final_is_clean: bool = True,
) -> list[StepDecision]:
    """DPM-Solver-v3 as its reference sampler orders it (v3 Alg. 1; the released ``sample`` loop).

    Step ``i`` predicts with order ``p_i = min(solver_order, i + 1)`` (``lower_order_final``: at most
    ``num_steps - i``). After the next evaluation the step is corrected with order ``p_i + corrector_pseudo``
    when that is >= 2, ``use_corrector`` is set and ``corrector_at[i]`` allows it (the half-corrector region,
    judged at the corrected point ``i + 1``); never after the last step. A final step onto a clean target
    (``final_is_clean``) is the first-order data step ``x0`` (it leaves the EMS grid).
    """
    num_steps = _check_steps(num_steps)
    order = _check_order(solver_order, 3)
    if isinstance(corrector_at, (str, bytes)):
        raise ValueError(f"`corrector_at` must hold one bool per step, got {corrector_at!r}")
    allow = [True] * num_steps if corrector_at is None else list(corrector_at)
    for v in allow:
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"`corrector_at` must hold one bool per step, got {v!r} among {allow!r}")
    allow = [bool(v) for v in allow]
    if len(allow) != num_steps:
        raise ValueError(f"`corrector_at` needs one flag per step ({num_steps}), got {len(allow)}")
    out = []
    for i in range(num_steps):
        if i == num_steps - 1 and final_is_clean:
            out.append(StepDecision(prediction="data", order=1))
            continue
        p = min(order, i + 1)
        if lower_order_final:
            p = min(p, num_steps - i)
        c = p + int(corrector_pseudo)
        correct = use_corrector and allow[i] and c >= 2 and i < num_steps - 1
        out.append(StepDecision(
            prediction="ems", order=p, pseudo=predictor_pseudo and p > 2,
            corrector="unic" if correct else "none",
            corrector_order=c if correct else None, corrector_pseudo=corrector_pseudo and correct,
        ))
    return out
