"""The phi-functions of exponential integrators, evaluated stably for small arguments.

``phi_0(z) = e^z`` and ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``, equivalently
``phi_k(z) = 1/(k-1)! * int_0^1 e^{(1-u) z} u^{k-1} du`` (Hochbruck & Ostermann 2010, eq. 2.10).

They give the exact integrals the multistep solvers need: for data prediction over a step of
length ``h`` in ``lambda``, ``int_0^h e^{-(h-u)} u^k/k! du = h^{k+1} phi_{k+1}(-h)``; for noise
prediction ``int_0^h e^{h-u} u^k/k! du = h^{k+1} phi_{k+1}(h)``.

The recursion loses all precision when ``|z|`` is small (catastrophic cancellation), so below a
threshold the Taylor series ``phi_k(z) = sum_j z^j / (j + k)!`` is summed instead.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["phi", "hphi", "phi_array"]

_SERIES_BELOW = 0.5
_SERIES_TERMS = 30
_SERIES_MAX_TERMS = 400
_RECURSION_MAX_K = 6  # up to here the recursion is accurate to ~1e-12 for |z| >= 0.5 (the engine's orders)


def _series_below(k: int) -> float:
    """``|z|`` under which the series is summed: the recursion divides by ``z`` ``k - 1`` times after
    subtracting ``1/j!``, which cancels catastrophically unless ``|z|`` is at least about ``k``."""
    return _SERIES_BELOW if k <= _RECURSION_MAX_K else float(k)


def _check_k(k: Any) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"`k` must be an integer >= 0, got {k!r}")
    return int(k)


def phi(k: int, z: float) -> float:
    """``phi_k(z)`` in float64 for ``k >= 0``; ``z`` may be ``-inf`` (then ``phi_k = 0`` for k=0, else limit)."""
    k = _check_k(k)
    if z == -math.inf:
        return 0.0
    if not math.isfinite(z):
        raise ValueError(f"phi_{k}({z}) is not finite")
    if k == 0:
        return math.exp(z)
    if abs(z) < _series_below(k):
        total, term = 0.0, 1.0 / math.factorial(k)
        for j in range(_SERIES_MAX_TERMS):
            total += term
            term *= z / (j + k + 1)
            if j + 1 >= _SERIES_TERMS and abs(term) <= 1e-17 * abs(total):
                break
        return total
    if z > 700.0:
        raise ValueError(f"phi_{k}({z}) overflows float64 (e^z); |z| must stay below ~700")
    value = math.expm1(z) / z  # phi_1
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def hphi(k: int, hh: float) -> float:
    """``hh * phi_k(hh) = phi_{k-1}(hh) - 1/(k-1)!``, which tends to ``-1/(k-1)!`` as ``hh -> -inf`` (a data-form
    step to a clean sample, sigma = 0).

    At ``hh = -inf`` only ``k = 1`` is returned (``-1``): a step onto sigma = 0 is first order here, because the
    higher-order terms' derivative estimates (divided differences over ``h``) blow up there even though this
    factor stays finite; ``k >= 2`` raises.
    """
    if hh == -math.inf:
        if k == 1:
            return -1.0
        raise ValueError(f"a step to sigma = 0 (h = -inf) is first order: the order-{k} term's derivative estimate "
                         "blows up there; use first order for the final step")
    return hh * phi(k, hh)


def phi_array(k: int, z: np.ndarray) -> np.ndarray:
    """``phi_k`` element-wise over a float64 array (finite ``z``): the series below ``|z| < 0.5``, the
    recursion elsewhere -- the same split as :func:`phi`, vectorised for per-element coefficients."""
    k = _check_k(k)
    z = np.asarray(z, dtype=np.float64)
    if not np.all(np.isfinite(z)):
        raise ValueError(f"phi_{k} needs finite arguments")
    if np.any(z > 700.0):
        raise ValueError(f"phi_{k} overflows float64 (e^z) for z > ~700, got max z = {float(z.max())}")
    if k == 0:
        return np.exp(z)
    small = np.abs(z) < _series_below(k)
    series = np.zeros_like(z)
    term = np.full_like(z, 1.0 / math.factorial(k))
    for j in range(_SERIES_MAX_TERMS):
        series += term
        term = term * np.where(small, z, 0.0) / (j + k + 1)
        if j + 1 >= _SERIES_TERMS and np.all(np.abs(term) <= 1e-17 * np.abs(series)):
            break
    safe = np.where(small, 1.0, z)
    value = np.expm1(safe) / safe
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / safe
    return np.where(small, series, value)
