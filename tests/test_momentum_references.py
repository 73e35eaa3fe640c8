"""Heavy ball / GHVB at ``beta < 1`` against independent references written from the documented formulas.

The other momentum tests mostly run at ``beta = 1`` (where momentum is the identity) or check orders and
stability; a mutation probe found that swapping Nesterov's weights, dropping the ``1/sigma`` of the data-space
variable, or putting momentum on UniPC's predictor as well survived them. Here every run is compared, step for
step in float64, with a plain loop written from the formulas of Wizadwongsa et al. (2024) as stated in the
docstrings of ``fewstep.samplers.momentum`` / ``fewstep.solvers.momentum`` and in the README:

* ``base="plms"``: ``e_n = AB_k(eps_n, ...)``, ``v_n = (1 - beta) v_{n-1} + beta e_n`` (``v_0 = e_0``),
  ``x_{n+1}/alpha_{n+1} = x_n/alpha_n + (sigma/alpha|_{n+1} - sigma/alpha|_n) v_n``; Nesterov steps with
  ``(1 - beta) v_n + beta e_n``.
* ``base="dpm-solver++"`` (data prediction, 2M midpoint): ``D = m0 + (m0 - m1)/(2r)``, ``r = h_prev/h``;
  ``v_n = (1 - beta) v_{n-1} + beta D`` on the multistep steps only (``v`` starts at the first ``D``),
  ``x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) v_n``, i.e. momentum on ``x/sigma`` against
  ``alpha/sigma``; the first-order warm-up and the final step run plain.
* ``base="unipc"``: momentum wraps the UniC-corrected update (``x/sigma`` against ``alpha/sigma`` for
  ``predict_x0=True``, ``x/alpha`` against ``sigma/alpha`` for ``predict_x0=False``); the predictor runs plain
  from the momentum-corrected sample and only picks where the model is evaluated next.
* ``ghvb``: ``v_n = (1 - beta) v_{n-1} + beta eps_n``, step with ``sum_j g_j(beta) v_{n-j}`` (notes, sec. 1.5).

The model is the exact denoiser of a Gaussian mixture, so the references need no network.
"""

from __future__ import annotations

import math

import pytest
import torch

from fewstep import samplers
from fewstep.bench.analytic import default_mixture

MIX = default_mixture(dim=3, seed=2)
STEPS = 8
TOL = {"rtol": 1e-9, "atol": 1e-10}

# Adams-Bashforth (PLMS) weights for constant steps, newest first (notes, sec. 1.2)
AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _ghvb_weights(k: int, beta: float) -> list[float]:
    """GHVB-k weights on the velocity history, newest first (notes, sec. 1.5; all divided by beta)."""
    rows = {
        1: ([beta], 1.0),
        2: ([2 + beta, -(2 - beta)], 2.0),
        3: ([18 + 5 * beta, -(24 - 8 * beta), 6 - beta], 12.0),
        4: ([46 + 9 * beta, -(78 - 19 * beta), 42 - 5 * beta, -(10 - beta)], 24.0),
    }
    row, den = rows[k]
    return [w / (den * beta) for w in row]


def _start(seed: int = 0) -> torch.Tensor:
    return torch.randn(12, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(sched, x: torch.Tensor, steps: int = STEPS):
    """Sample with a fewstep scheduler (epsilon prediction) on the mixture's exact denoiser; also return the grid."""
    sched.set_timesteps(steps)
    grid = sched.plan.grid
    assert len(sched.timesteps) == steps == grid.num_steps
    x = x * float(grid.sigmas[0])
    for i, t in enumerate(sched.timesteps):
        _, eps = MIX.denoise(x, float(grid.alphas[i]), float(grid.sigmas[i]))
        x = sched.step(eps, t, x).prev_sample
    return x, grid


def _points(grid):
    a = [float(v) for v in grid.alphas]
    s = [float(v) for v in grid.sigmas]
    lam = [math.log(ai / si) if si > 0 else math.inf for ai, si in zip(a, s)]
    return a, s, lam


# ----------------------------------------------------------------------------------------------------
# PLMS-k + heavy ball (plain and Nesterov), GHVB-k: DDIM space
def _plms_reference(grid, x, k, beta, mode="hb", nesterov=False):
    a, s, _ = _points(grid)
    y = x / a[0]  # x-bar = x / alpha
    eps_hist, v_hist, v = [], [], None
    for i in range(len(a) - 1):
        _, eps = MIX.denoise(y * a[i], a[i], s[i])
        d_rho = s[i + 1] / a[i + 1] - s[i] / a[i]
        eps_hist.append(eps)
        if mode == "hb":
            w = AB[min(k, len(eps_hist))]
            e = sum(wj * eps_hist[-1 - j] for j, wj in enumerate(w))
            v = e if v is None else (1 - beta) * v + beta * e
            used = (1 - beta) * v + beta * e if nesterov else v
        else:
            v = eps if v is None else (1 - beta) * v + beta * eps
            v_hist.append(v)
            w = _ghvb_weights(min(k, len(v_hist)), beta)
            used = sum(wj * v_hist[-1 - j] for j, wj in enumerate(w))
        y = y + d_rho * used
    return y * a[-1]


@pytest.mark.parametrize("k, beta", [(4, 0.7), (2, 0.5), (1, 0.6)])
@pytest.mark.parametrize("nesterov", [False, True])
def test_heavy_ball_on_plms_matches_the_paper_formula(k, beta, nesterov):
    """Nesterov steps with ``(1 - beta) v_n + beta e_n`` (docstrings, notes sec. 1.3). A mutant that swapped the
    weights (``beta v_n + (1 - beta) e_n``) moved the result by 5-11% at beta = 0.7 and survived the other tests."""
    out, grid = _run(samplers.get("hb")(base="plms", solver_order=k, beta=beta, nesterov=nesterov), _start())
    expected = _plms_reference(grid, _start() * float(grid.sigmas[0]), k, beta, nesterov=nesterov)
    torch.testing.assert_close(out, expected, **TOL)


@pytest.mark.parametrize("k, beta", [(4, 0.8), (3, 0.5), (2, 0.3)])
def test_ghvb_matches_the_paper_formula(k, beta):
    out, grid = _run(samplers.get("ghvb")(solver_order=k, beta=beta), _start(1))
    expected = _plms_reference(grid, _start(1) * float(grid.sigmas[0]), k, beta, mode="ghvb")
    torch.testing.assert_close(out, expected, **TOL)


# ----------------------------------------------------------------------------------------------------
# DPM-Solver++ 2M (midpoint) + heavy ball: data space, x/sigma against alpha/sigma
def _dpm_2m_reference(grid, x, beta, nesterov=False):
    a, s, lam = _points(grid)
    n = len(a) - 1
    x0s, v = [], None
    for i in range(n):
        x0, _ = MIX.denoise(x, a[i], s[i])
        x0s.append(x0)
        if s[i + 1] == 0.0:  # the final step onto sigma = 0 (first order, plain): the data prediction itself
            assert i == n - 1
            x = x0
            continue
        h = lam[i + 1] - lam[i]
        if i == 0:  # first-order warm-up, plain
            x = (s[i + 1] / s[i]) * x - a[i + 1] * math.expm1(-h) * x0
            continue
        r = (lam[i] - lam[i - 1]) / h
        d = x0 + (x0 - x0s[-2]) / (2 * r)
        v = d if v is None else (1 - beta) * v + beta * d
        used = (1 - beta) * v + beta * d if nesterov else v
        x = (s[i + 1] / s[i]) * x - a[i + 1] * math.expm1(-h) * used
    return x


@pytest.mark.parametrize("beta", [1.0, 0.8, 0.5])
@pytest.mark.parametrize("nesterov", [False, True])
def test_heavy_ball_on_dpm_solver_pp_matches_the_paper_formula(beta, nesterov):
    """The notes (sec. 1.4): ``x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) v_n`` with ``v`` the average
    of the 2M combinations ``D``. A mutant that took ``u = alpha`` instead of ``alpha/sigma`` as the data-space
    variable moved the result by 8.6% at beta = 0.8 and survived the other tests."""
    sched = samplers.get("hb")(base="dpm-solver++", solver_order=2, beta=beta, nesterov=nesterov)
    out, grid = _run(sched, _start(4))
    assert float(grid.sigmas[-1]) == 0.0
    expected = _dpm_2m_reference(grid, _start(4) * float(grid.sigmas[0]), beta, nesterov)
    torch.testing.assert_close(out, expected, **TOL)
    if beta == 1.0:  # the reference's base is diffusers' DPM-Solver++ 2M as fewstep ships it
        base, _ = _run(samplers.get("dpm-solver++")(solver_order=2), _start(4))
        torch.testing.assert_close(base, expected, **TOL)


# ----------------------------------------------------------------------------------------------------
# UniPC-2 (UniP-2 predictor, UniC corrector) + heavy ball on the corrected update
def _unipc_coefficients(h, order, predict_x0, solver_type, rk=None):
    """UniPC's ``(hh, h phi_1, B(h), rhos_c)`` for one step (Zhao et al. 2023, Alg. 2; rhos_c solve
    ``R rho = b`` with ``R_ij = rk_j^(i-1)``, ``b_i = i! phi_{i+1}(hh) hh / B(h)``)."""
    hh = -h if predict_x0 else h
    h_phi_1 = math.expm1(hh)
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    phi2 = h_phi_1 / hh - 1  # hh * phi_2(hh)
    if order == 1:
        return hh, h_phi_1, b_h, [0.5]
    phi3 = phi2 / hh - 0.5  # hh * phi_3(hh)
    b1, b2 = phi2 / b_h, 2 * phi3 / b_h
    # [[1, 1], [rk, 1]] @ [rho0, rho1] = [b1, b2]
    rho0 = (b1 - b2) / (1 - rk)
    return hh, h_phi_1, b_h, [rho0, b1 - rho0]


def _unipc_reference(grid, x, beta, predict_x0, solver_type):
    a, s, lam = _points(grid)
    n = len(a) - 1
    orders = [1 if i == n - 1 else min(2, i + 1, n - i) for i in range(n)]  # lower_order_final, last step order 1

    def c_u(i):  # momentum space: y = c x against u
        return (1 / s[i], a[i] / s[i]) if predict_x0 else (1 / a[i], s[i] / a[i])

    def update(i, x_s, ms, order, m_t=None):
        """UniP (``m_t is None``) or UniC (with the new evaluation ``m_t``) from point ``i`` to ``i + 1``."""
        h = lam[i + 1] - lam[i]
        m0 = ms[i]
        rk = (lam[i - 1] - lam[i]) / h if order == 2 else None
        hh, h_phi_1, b_h, rhos_c = _unipc_coefficients(h, order, predict_x0, solver_type, rk)
        if predict_x0:
            base, scale = (s[i + 1] / s[i]) * x_s - a[i + 1] * h_phi_1 * m0, a[i + 1]
        else:
            base, scale = (a[i + 1] / a[i]) * x_s - s[i + 1] * h_phi_1 * m0, s[i + 1]
        d1 = (ms[i - 1] - m0) / rk if order == 2 else None
        if m_t is None:  # UniP-p: rho_p = 1/2 at order 2
            return base if order == 1 else base - scale * b_h * 0.5 * d1
        res = rhos_c[-1] * (m_t - m0)
        if order == 2:
            res = res + rhos_c[0] * d1
        return base - scale * b_h * res

    ms, v, last = [], None, None
    for i in range(n):
        x0, eps = MIX.denoise(x, a[i], s[i])  # evaluated where the (plain) predictor landed
        m = x0 if predict_x0 else eps
        if i > 0:
            corrected = update(i - 1, last, ms, orders[i - 1], m_t=m)
            (c_s, u_s), (c_t, u_t) = c_u(i - 1), c_u(i)
            d = (c_t * corrected - c_s * last) / (u_t - u_s)
            v = d if v is None else (1 - beta) * v + beta * d
            x = (c_s * last + (u_t - u_s) * v) / c_t  # heavy ball on the corrected update
        ms.append(m)
        last = x
        x = update(i, x, ms, orders[i])  # the predictor: plain
    return x


@pytest.mark.parametrize("beta", [1.0, 0.8])
@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("solver_type", ["bh2", "bh1"])
def test_heavy_ball_on_unipc_wraps_the_corrected_update_only(beta, predict_x0, solver_type):
    """The docstring and README: with UniPC the momentum wraps the corrected update; the predictor only picks the
    next evaluation point. A mutant that applied momentum to the predictor as well moved the result by 1-3%
    (6.5% with ``predict_x0=False``) at beta = 0.8 and survived the other tests."""
    opts = {"solver_order": 2, "predict_x0": predict_x0, "solver_type": solver_type,
            "final_sigmas_type": "sigma_min"}
    out, grid = _run(samplers.get("hb")(base="unipc", beta=beta, **opts), _start(5))
    assert float(grid.sigmas[-1]) > 0.0
    expected = _unipc_reference(grid, _start(5) * float(grid.sigmas[0]), beta, predict_x0, solver_type)
    torch.testing.assert_close(out, expected, **TOL)
    if beta == 1.0:  # the reference's base is UniPC-2 as fewstep ships it
        base, _ = _run(samplers.get("unipc")(**opts), _start(5))
        torch.testing.assert_close(base, expected, **TOL)
