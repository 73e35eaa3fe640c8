"""phi-functions against quadrature of their integral form, across the series/recursion switch."""

from __future__ import annotations

import math

import pytest
from scipy.integrate import quad

from fewstep.solvers.phi import hphi, phi

ZS = [-20.0, -1.0, -0.49, -0.51, -1e-8, 0.0, 1e-8, 0.3, 2.0]


def _phi_quad(k: int, z: float) -> float:
    """``1/(k-1)! * int_0^1 e^{(1-u) z} u^{k-1} du`` by adaptive quadrature."""
    value, _ = quad(lambda u: math.exp((1.0 - u) * z) * u ** (k - 1), 0.0, 1.0, epsabs=0.0, epsrel=1e-13, limit=200)
    return value / math.factorial(k - 1)


@pytest.mark.parametrize("z", ZS)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_phi_matches_quadrature(k, z):
    assert phi(k, z) == pytest.approx(_phi_quad(k, z), rel=1e-12, abs=0)


@pytest.mark.parametrize("z", [-0.05, 0.01, 0.2, -0.5, 0.5, -0.5000001, 0.4999999, -3.7, 7.5, 25.0])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_phi_matches_quadrature_near_switch_and_far(k, z):
    assert phi(k, z) == pytest.approx(_phi_quad(k, z), rel=1e-11, abs=0)


@pytest.mark.parametrize("z", [-20.0, -1.0, -0.3, 0.0, 0.3, 2.0])
def test_phi_0_is_exp(z):
    assert phi(0, z) == math.exp(z)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_phi_at_zero_is_inverse_factorial(k):
    assert phi(k, 0.0) == pytest.approx(1.0 / math.factorial(k), rel=1e-15)


@pytest.mark.parametrize("z", [-5.0, -0.7, -0.2, -1e-3, 1e-3, 0.2, 0.7, 3.0])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_recurrence(k, z):
    """phi_{k+1}(z) z = phi_k(z) - 1/k! (checked where both sides are well conditioned)."""
    lhs = phi(k + 1, z) * z
    rhs = phi(k, z) - 1.0 / math.factorial(k)
    assert lhs == pytest.approx(rhs, rel=1e-11, abs=1e-15)


@pytest.mark.parametrize("side", [-1.0, 1.0])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_continuous_across_series_switch(k, side):
    """Just inside |z| = 0.5 the series is used, just outside the recursion: they must agree.

    (The recursion loses ~(1/|z|)^(k-1) in relative accuracy: ~1e-12 at k = 6, fine for the orders <= 5 the
    engine uses; at k >= 8 it would be ~1e-10.)"""
    edge = side * 0.5
    inner, outer = phi(k, edge * (1 - 1e-12)), phi(k, edge * (1 + 1e-12))
    assert inner == pytest.approx(outer, rel=5e-12)
    assert outer == pytest.approx(_phi_quad(k, edge), rel=5e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_small_arguments_do_not_cancel(k):
    """The naive recursion is useless at z = 1e-8 for k >= 2; the series is accurate to the last bits."""
    for z in (1e-8, -1e-8, 1e-300, -1e-12):
        expected = sum(z**j / math.factorial(j + k) for j in range(4))
        assert phi(k, z) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("h", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_exponential_integrator_integrals(k, h):
    """The module's use: int_0^h e^{-(h-u)} u^k/k! du = h^{k+1} phi_{k+1}(-h), and the e^{+} counterpart."""
    fact = math.factorial(k)
    minus, _ = quad(lambda u: math.exp(-(h - u)) * u**k / fact, 0.0, h, epsabs=0.0, epsrel=1e-13)
    plus, _ = quad(lambda u: math.exp(h - u) * u**k / fact, 0.0, h, epsabs=0.0, epsrel=1e-13)
    assert h ** (k + 1) * phi(k + 1, -h) == pytest.approx(minus, rel=1e-12)
    assert h ** (k + 1) * phi(k + 1, h) == pytest.approx(plus, rel=1e-12)


@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_phi_at_minus_infinity_is_zero(k):
    assert phi(k, -math.inf) == 0.0
    assert abs(phi(k, -1e6)) < 1e-5 if k else phi(k, -1e6) == 0.0


def test_hphi():
    assert hphi(1, -math.inf) == -1.0
    assert hphi(1, -60.0) == pytest.approx(-1.0, rel=1e-15)
    assert hphi(1, -1e8) == pytest.approx(-1.0, rel=1e-15)
    for k, h in [(1, -0.7), (2, -2.0), (3, 0.25), (2, 0.0)]:
        assert hphi(k, h) == h * phi(k, h)
    with pytest.raises(ValueError, match="a step to sigma = 0 .* is first order: the order-2 term"):
        hphi(2, -math.inf)
    for k in (2, 3, 4):  # the factor itself tends to -1/(k-1)! (the docstring's limit)
        assert hphi(k, -1e8) == pytest.approx(-1.0 / math.factorial(k - 1), rel=1e-6)
    with pytest.raises(ValueError, match=r"a step to sigma = 0 \(h = -inf\) is first order: the order-3 term"):
        hphi(3, -math.inf)


@pytest.mark.parametrize("k,z,match", [(-1, 0.5, r"`k` must be an integer >= 0, got -1"),
                                       (1, math.nan, r"phi_1\(nan\) is not finite"),
                                       (2, math.inf, r"phi_2\(inf\) is not finite"),
                                       (0, math.nan, r"phi_0\(nan\) is not finite")],
                         ids=["negative-k", "phi1-nan", "phi2-inf", "phi0-nan"])  # fmt: skip
def test_bad_arguments(k, z, match):
    with pytest.raises(ValueError, match=match):
        phi(k, z)
