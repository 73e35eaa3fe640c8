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

import numpy as np

__all__ = ["phi", "hphi", "phi_array"]

_SERIES_BELOW = 0.5
_SERIES_TERMS = 30


def phi(k: int, z: float) -> float:
    """``phi_k(z)`` in float64 for ``k >= 0``; ``z`` may be ``-inf`` (then ``phi_k = 0`` for k=0, else limit)."""
    if k < 0:
        raise ValueError(f"`k` must be >= 0, got {k}")
    if z == -math.inf:
        return 0.0
    if not math.isfinite(z):
        raise ValueError(f"phi_{k}({z}) is not finite")
    if k == 0:
        return math.exp(z)
    if abs(z) < _SERIES_BELOW:
        total, term = 0.0, 1.0 / math.factorial(k)
        for j in range(_SERIES_TERMS):
            total += term
            term *= z / (j + k + 1)
        return total
    value = math.expm1(z) / z  # phi_1
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def hphi(k: int, hh: float) -> float:
    """``hh * phi_k(hh)``; the limit for ``hh = -inf`` (a step to a clean sample) is ``-1/(k-1)!``... for k=1.

    Only ``k = 1`` has a finite limit at ``-inf`` (``-1``); higher ``k`` diverge and raise.
    """
    if hh == -math.inf:
        if k == 1:
            return -1.0
        raise ValueError(f"h*phi_{k}(h) diverges for a step to sigma = 0; use first order for the final step")
    return hh * phi(k, hh)


def phi_array(k: int, z: np.ndarray) -> np.ndarray:
    """``phi_k`` element-wise over a float64 array (finite ``z``): the series below ``|z| < 0.5``, the
    recursion elsewhere -- the same split as :func:`phi`, vectorised for per-element coefficients."""
    if k < 0:
        raise ValueError(f"`k` must be >= 0, got {k}")
    z = np.asarray(z, dtype=np.float64)
    if not np.all(np.isfinite(z)):
        raise ValueError(f"phi_{k} needs finite arguments")
    if k == 0:
        return np.exp(z)
    small = np.abs(z) < _SERIES_BELOW
    series = np.zeros_like(z)
    term = np.full_like(z, 1.0 / math.factorial(k))
    for j in range(_SERIES_TERMS):
        series += term
        term = term * z / (j + k + 1)
    safe = np.where(small, 1.0, z)
    value = np.expm1(safe) / safe
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / safe
    return np.where(small, series, value)
