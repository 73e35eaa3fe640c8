"""DPM-Solver-v3's empirical model statistics (EMS) and the per-element step coefficients built on them.

Zheng, Lu, Chen & Zhu (NeurIPS 2023), sec. 3. With ``y = x/alpha`` the PF-ODE in ``lambda = log(alpha/sigma)``
is ``dy/dlambda = -l y - f`` where ``f = (sigma eps - l x)/alpha`` and ``l = l_lambda`` is a per-element
function of ``lambda`` (the linear part taken out of the model). ``f`` is rescaled and shifted by two more
per-element functions ``s_lambda``, ``b_lambda``: on a step starting at ``lambda_s``,
``g(lambda) = e^{-int_{s} s} f - int_{s} e^{-int s} b``. The exact solution (eq. 9) is ::

    x_t = alpha_t e^{-int_s^t l} [ x_s/alpha_s - int_s^t e^{int_s^r (l+s)} (g(r) + B_s(r)) dr ]

and expanding ``g`` in a Taylor series around ``lambda_s`` gives the order-``n+1`` step (eq. 11)::

    x_t = A x_s - P f_s - Q - sum_k R_k g^(k)_s,   A = (alpha_t/alpha_s) e^{L_s - L_t}, ...

with ``R_k = alpha_t e^{L_s - L_t} int_s^t e^{a(r) - a_s} (r - lambda_s)^k/k! dr``, ``a = L + S`` the running
integrals of ``l + s``. ``(l, s, b) = (1, 0, 0)`` is DPM-Solver++ (data prediction), ``(0, -1, 0)`` DPM-Solver
(noise prediction).

**Quadrature.** The tables live on a grid uniform in ``lambda``; ``l, s, b`` are taken piecewise linear between
grid points (so ``L, S`` are exact trapezoid sums) and every integral of ``e^{a} q`` is done interval by
interval with ``a`` linear on the interval and ``q`` integrated exactly (``phi``-function weights). The paper's
code uses the plain trapezoid rule; the exponential rule is as cheap, more accurate where ``l + s`` is large and
exact for the degenerate tables, so ``degenerated`` v3 reproduces DPM-Solver++ to float precision.

**Pair form** (DESIGN contract 2). Every term is written on the buffered ``(x0, eps)`` pairs: ``x`` at an
evaluation point is ``alpha x0 + sigma eps`` and ``f = (1 - l)(sigma/alpha) eps - l x0``; the start point's
move by a corrector enters as ``A (x_s - x_s^eval)``. This is exactly v3's corrector bookkeeping (the corrector
shifts the cached noise so ``sigma eps - l x`` is unchanged) and lets CFG++ hand an inconsistent pair.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import stored_float64
from .grids import MIN_LAMBDA_GAP
from .phi import phi_array

__all__ = [
    "EMS", "EMSTransition", "EMS_FORMAT", "ems_transition", "derivative_matrix", "load_ems", "save_ems",
    "snap_grid",
]

EMS_FORMAT = "fewstep.ems"
_VERSION = "1"
#: relative tolerance of the EMS grid's uniform spacing (of one spacing): ``fewstep calibrate ems`` writes a float64
#: ``linspace`` (deviations ~1e-13 of a spacing); tables stored in lower precision add their own rounding on top
_UNIFORM_RTOL = 1e-6


def _float_eps(dtype: Any) -> float:
    """Machine epsilon of a numpy or torch floating dtype (float64's for anything else)."""
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps) if dtype.is_floating_point else float(np.finfo(np.float64).eps)
    try:
        return float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else float(np.finfo(np.float64).eps)
    except TypeError:
        return float(np.finfo(np.float64).eps)


@dataclass
class EMS:
    """Per-element statistics ``l, s, b`` on ``N + 1`` grid points uniform in ``lambda``.

    ``lambdas`` increase (index 0 is the noisiest point, as in the paper's tables) with a uniform spacing of at least
    ``grids.MIN_LAMBDA_GAP`` (``snap`` and the grid-index arithmetic of the steps assume it); ``l, s, b`` have shape
    ``(N + 1, *sample_shape)`` where ``sample_shape`` is one sample without the batch dimension. ``meta`` holds
    what the tables are valid for (model, noise schedule, time range, number of samples ``K``).

    ``lambdas_dtype`` (init only): the dtype the lambdas were stored in when they were upcast to float64 (``load_ems``
    passes the file's): the uniform-spacing check then allows that dtype's rounding. By default the dtype of
    ``lambdas`` itself (a float32 array or tensor), else float64. ``lambda_resolution`` is that rounding, in lambda.
    """

    lambdas: np.ndarray
    l: np.ndarray  # noqa: E741 - the paper's name
    s: np.ndarray
    b: np.ndarray
    meta: dict = field(default_factory=dict)
    lambdas_dtype: InitVar[Any] = None

    def __post_init__(self, lambdas_dtype: Any = None) -> None:
        self._lambdas_dtype = lambdas_dtype if lambdas_dtype is not None else getattr(self.lambdas, "dtype", None)
        eps = _float_eps(self._lambdas_dtype)
        self.lambdas = np.asarray(self.lambdas, dtype=np.float64).reshape(-1)
        n = self.lambdas.size
        if n < 2:
            raise ValueError(f"EMS need at least 2 grid points, got {n}")
        if not np.all(np.isfinite(self.lambdas)) or np.any(np.diff(self.lambdas) <= 0):
            raise ValueError("EMS `lambdas` must be finite and strictly increasing (noisiest point first)")
        self.lambda_resolution = eps * float(np.max(np.abs(self.lambdas)))
        self._check_uniform()
        for name in ("l", "s", "b"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.ndim < 1 or arr.shape[0] != n:
                raise ValueError(f"EMS `{name}` must have shape ({n}, *sample_shape), got {arr.shape}")
            bad = ~np.isfinite(arr.reshape(n, -1)).all(axis=1)
            if bad.any():
                raise ValueError(
                    f"EMS `{name}` holds NaN/Inf at grid points {np.flatnonzero(bad)[:8].tolist()}; "
                    "re-estimate them (`fewstep calibrate ems`)"
                )
            setattr(self, name, arr)
        if not (self.l.shape == self.s.shape == self.b.shape):
            shapes = f"{self.l.shape}, {self.s.shape}, {self.b.shape}"
            raise ValueError(f"EMS `l`, `s`, `b` must share one shape, got {shapes}")
        self.meta = dict(self.meta)

    def __eq__(self, other: object) -> bool:
        """Equal tables: the same ``lambdas``, ``l``, ``s``, ``b`` (element by element) and ``meta``. (The generated
        dataclass ``==`` compared the arrays with ``==`` and raised "truth value of an array is ambiguous".) Still
        unhashable (mutable tables), as before."""
        if not isinstance(other, EMS):
            return NotImplemented
        return all(np.array_equal(getattr(self, k), getattr(other, k)) for k in ("lambdas", "l", "s", "b")) and (
            self.meta == other.meta
        )

    def _check_uniform(self) -> None:
        """``lambdas`` uniformly spaced (to ``_UNIFORM_RTOL`` of a spacing, plus twice the stored values' rounding),
        the spacing at least ``MIN_LAMBDA_GAP``."""
        lam = self.lambdas
        lo, hi = float(lam[0]), float(lam[-1])
        step = (hi - lo) / (lam.size - 1)
        if step < MIN_LAMBDA_GAP:
            raise ValueError(
                f"EMS `lambdas` span [{lo!r}, {hi!r}] in {lam.size - 1} intervals: a spacing of {step:.3g}, below the "
                f"minimum {MIN_LAMBDA_GAP:g} (sampling steps snap to these points and the solver divides by their "
                "gaps); estimate EMS over the schedule's lambda range (`fewstep calibrate ems`)"
            )
        dev = np.abs(np.diff(lam) - step)
        tol = _UNIFORM_RTOL * step + 2.0 * self.lambda_resolution
        if float(dev.max()) > tol:
            i = int(np.argmax(dev))
            raise ValueError(
                f"EMS `lambdas` must be uniformly spaced (a linspace in lambda: the steps snap to it by its spacing); "
                f"interval {i} ([{float(lam[i])!r}, {float(lam[i + 1])!r}]) is {lam[i + 1] - lam[i]:.9g} wide, the "
                f"spacing of [{lo!r}, {hi!r}] in {lam.size - 1} intervals is {step:.9g} (allowed deviation {tol:.3g}); "
                "re-estimate them (`fewstep calibrate ems`)"
            )

    @property
    def num_points(self) -> int:
        return int(self.lambdas.size)

    @property
    def digest(self) -> str:
        """A short content hash of the tables (``lambdas``, ``l``, ``s``, ``b`` as float64): what a solver schedule
        searched with these EMS records, so it can tell other tables apart from the ones it was searched on."""
        h = hashlib.sha256()
        for arr in (self.lambdas, self.l, self.s, self.b):
            h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.l.shape[1:])

    def degenerated(self) -> EMS:
        """The same grid with ``l = 1, s = b = 0``: v3 then is DPM-Solver++ (the paper's ``degenerated=True``)."""
        ones = np.ones_like(self.l)
        return EMS(self.lambdas, ones, np.zeros_like(self.s), np.zeros_like(self.b), {**self.meta, "degenerated": True},
                   lambdas_dtype=self._lambdas_dtype)

    def snap(self, lam: Any, what: str = "lambda") -> np.ndarray:
        """Indices of the grid points nearest to ``lam`` (v3 snaps its time steps to the EMS grid).

        Raises if a value lies outside the grid by more than half a grid spacing."""
        lam = np.asarray(lam, dtype=np.float64).reshape(-1)
        if np.any(np.isnan(lam)):
            raise ValueError(f"{what} must not be NaN, got {lam.tolist()}")
        lo, hi = self.lambdas[0], self.lambdas[-1]
        step = (hi - lo) / (self.num_points - 1)
        outside = (lam < lo - 0.5 * step) | (lam > hi + 0.5 * step)
        if outside.any():
            raise ValueError(
                f"{what} {lam[outside].tolist()} lies outside the EMS grid lambda in [{lo:.4f}, {hi:.4f}]; "
                "estimate EMS over a wider time range (`fewstep calibrate ems --t-start/--t-end`)"
            )
        return np.clip(np.round((lam - lo) / step), 0, self.num_points - 1).astype(np.int64)


def snap_grid(ems: EMS, noise_schedule: Any, grid: Any) -> tuple[Any, tuple[int, ...]]:
    """Move every evaluation point of ``grid`` (and a non-clean target) to the nearest EMS grid point (v3 sec.
    3.3), so that v3 steps integrate exactly between the points the model is evaluated at.

    Returns the snapped ``TimeGrid`` and each grid point's EMS index (``-1`` for a clean final target, which
    only a non-EMS step may reach). Two points snapping to one EMS point is an error."""
    from .grids import TimeGrid

    clean = grid.clean_end
    idx = ems.snap(grid.finite_lambdas, "the time steps' lambda")
    if np.any(np.diff(idx) <= 0):
        raise ValueError(
            f"{grid.num_steps} steps snap to repeated EMS grid points {idx.tolist()}: the EMS grid has "
            f"{ems.num_points} points; use fewer steps, steps further apart, or EMS estimated on a finer grid"
        )
    times = noise_schedule.t_of_lambda(ems.lambdas[idx])
    alphas, sigmas = noise_schedule.alpha_sigma(times)
    indices = tuple(int(i) for i in idx)
    if clean:
        alphas, sigmas = np.append(alphas, grid.alphas[-1]), np.append(sigmas, grid.sigmas[-1])
        indices = indices + (-1,)
    else:
        times = times[:-1]
    return TimeGrid(times, alphas, sigmas), indices


# -------------------------------------------------------------------------------------------------------------
# quadrature on the grid
def _cumtrapz(values: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Running trapezoid integral from the first node (exact for piecewise-linear ``values``)."""
    d = np.diff(lam).reshape((-1,) + (1,) * (values.ndim - 1))
    out = np.zeros_like(values)
    out[1:] = np.cumsum(0.5 * d * (values[1:] + values[:-1]), axis=0)
    return out


def _cum_exp_linear(a: np.ndarray, q: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Running ``int e^{a} q dlambda`` from the first node: ``a`` and ``q`` linear on each interval.

    On an interval of width ``d`` with ``z = a_{i+1} - a_i``:
    ``int = d e^{a_i} [q_i phi_2(z) + q_{i+1} (phi_1(z) - phi_2(z))]``."""
    d = np.diff(lam).reshape((-1,) + (1,) * (a.ndim - 1))
    z = a[1:] - a[:-1]
    p1, p2 = phi_array(1, z), phi_array(2, z)
    pieces = d * np.exp(a[:-1]) * (q[:-1] * p2 + q[1:] * (p1 - p2))
    out = np.zeros_like(a)
    out[1:] = np.cumsum(pieces, axis=0)
    return out


def _exp_poly_integral(a: np.ndarray, lam: np.ndarray, k: int) -> np.ndarray:
    """``int_{lam[0]}^{lam[-1]} e^{a} (r - lam[0])^k / k! dr`` with ``a`` linear per interval, the polynomial exact.

    On ``[lam_i, lam_i + d]`` with ``c = lam_i - lam[0]``: ``(c + u)^k/k! = sum_m c^{k-m}/(k-m)! u^m/m!`` and
    ``int_0^d e^{a_i + z u/d} u^m/m! du = d^{m+1} e^{a_{i+1}} phi_{m+1}(-z)``."""
    d = np.diff(lam).reshape((-1,) + (1,) * (a.ndim - 1))
    c = (lam[:-1] - lam[0]).reshape(d.shape)
    z = a[1:] - a[:-1]
    total = np.zeros_like(z)
    for m in range(k + 1):
        total = total + (c ** (k - m) / math.factorial(k - m)) * d ** (m + 1) * phi_array(m + 1, -z)
    return np.sum(np.exp(a[1:]) * total, axis=0)


def derivative_matrix(deltas: Sequence[float], pseudo: bool = False) -> np.ndarray:
    """``M`` with ``g^(k)_s ~ sum_j M[k-1, j] (g_j - g_s)``, ``deltas[j] = lambda_j - lambda_s``.

    Default: the Taylor fit through all points (Vandermonde ``sum_k delta_j^k/k! g^(k) = g_j - g_s``).
    ``pseudo`` (v3 sec. 3.4, "pseudo-order"): the ``k``-th derivative uses only the ``k + 1`` first points
    ``[s, j_1, .., j_k]`` by Newton divided differences, ``g^(k) = k! D^(k)_0``."""
    dl = np.asarray(deltas, dtype=np.float64)
    n = dl.size
    if n == 0:
        return np.zeros((0, 0))
    if not np.all(np.isfinite(dl)):
        raise ValueError(f"derivative points' lambda offsets must be finite, got {dl.tolist()}")
    if np.any(dl == 0) or len(set(dl.tolist())) != n:
        raise ValueError(f"derivative points must be distinct and differ from the start point, got {dl.tolist()}")
    if not pseudo:
        vander = np.stack([dl**k / math.factorial(k) for k in range(1, n + 1)], axis=1)
        return np.linalg.inv(vander)
    nodes = np.concatenate([[0.0], dl])
    # Divided differences of the unit vectors e_0..e_n (values at [s, j_1, .., j_n]).
    table = np.eye(n + 1)
    out = np.zeros((n, n))
    for k in range(1, n + 1):
        table = np.stack([(table[i] - table[i + 1]) / (nodes[i] - nodes[i + k]) for i in range(n + 1 - k)])
        out[k - 1] = math.factorial(k) * table[0][1:]  # coefficients of g_j; that of g_s is minus their sum
    return out


# -------------------------------------------------------------------------------------------------------------
# one step
@dataclass(frozen=True)
class EMSTransition:
    """A v3 transition ``s -> t`` as per-element coefficients on buffered pairs (host float64 arrays).

    ``x_t = lin * (x_start - x_base^eval) + sum_(offset) (cx0 * x0_offset + ceps * eps_offset) + const``;
    offsets are buffer offsets at the time the transition is applied (``0`` = newest evaluation)."""

    base: int
    lin: np.ndarray
    terms: tuple[tuple[int, np.ndarray, np.ndarray], ...]
    const: np.ndarray
    kind: str = "ems"
    noise: float = 0.0
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def tensors(self, like: torch.Tensor) -> tuple:
        """The coefficients as tensors on ``like``'s device and dtype, converted once per (device, dtype)."""
        key = (like.device, like.dtype)
        hit = self._cache.get(key)
        if hit is None:
            def conv(a):
                return torch.as_tensor(a, dtype=like.dtype).to(like.device)

            hit = (conv(self.lin), tuple((o, conv(cx), conv(ce)) for o, cx, ce in self.terms), conv(self.const))
            self._cache[key] = hit
        return hit

    def apply(self, x_start: torch.Tensor, buffer: Sequence[Any]) -> torch.Tensor:
        lin, terms, const = self.tensors(x_start)
        if lin.dim() and tuple(lin.shape) != tuple(x_start.shape[1:]):
            raise ValueError(
                f"EMS are for samples of shape {tuple(lin.shape)}, got a batch of shape {tuple(x_start.shape)}; "
                "estimate EMS for this model and resolution (`fewstep calibrate ems`)"
            )
        base = buffer[-1 - self.base]
        out = lin * (x_start - base.x_eval) + const
        for offset, cx, ce in terms:
            ev = buffer[-1 - offset]
            past = getattr(ev, "history", None) if offset not in (0, self.base) else None  # Evaluation.history
            x0, eps = past if past is not None else (ev.x0, ev.eps)
            out = out + cx * x0 + ce * eps
        return out


def ems_transition(
    ems: EMS,
    i_s: int,
    i_t: int,
    points: Sequence[int],
    alphas: Mapping[int, float],
    sigmas: Mapping[int, float],
    offsets: Mapping[int, int],
    pseudo: bool = False,
) -> EMSTransition:
    """Compile the v3 update from EMS grid index ``i_s`` to ``i_t`` (eq. 11 in pair form; see module docstring).

    ``points``: EMS grid indices of the buffered evaluations used for the derivatives of ``g`` (the start
    ``i_s`` excluded); ``alphas``/``sigmas``: the noise levels at ``i_s``, ``i_t`` and every point; ``offsets``:
    buffer offset of every evaluation (``i_s`` and ``points``) when the transition is applied."""
    idx = [i_s, i_t, *points]
    if i_t <= i_s or i_s in points or len(set(points)) != len(points):
        raise ValueError(
            f"a v3 step needs distinct EMS grid points and i_t > i_s (towards less noise), got start {i_s}, "
            f"end {i_t}, points {list(points)}; two sampling steps snapped to one EMS point: use fewer steps or "
            "EMS with more grid points"
        )
    lo, hi = min(idx), max(idx)
    lam = ems.lambdas[lo : hi + 1]
    L = _cumtrapz(ems.l[lo : hi + 1], lam)
    S = _cumtrapz(ems.s[lo : hi + 1], lam)
    s0, t0 = i_s - lo, i_t - lo
    L, S = L - L[s0], S - S[s0]
    a = L + S
    # B_s at every node: int_{lambda_s} e^{-(S(r) - S_s)} b(r) dr (negative for nodes before s)
    cum_b = _cum_exp_linear(-S, ems.b[lo : hi + 1], lam)
    b_loc = cum_b - cum_b[s0]
    lam_st, a_st, bl_st = lam[s0 : t0 + 1], a[s0 : t0 + 1], b_loc[s0 : t0 + 1]
    p_int = _cum_exp_linear(a_st, np.ones_like(a_st), lam_st)[-1]
    q_int = _cum_exp_linear(a_st, bl_st, lam_st)[-1]
    a_s, a_t = alphas[i_s], alphas[i_t]
    decay = a_t * np.exp(-L[t0])
    lin = (a_t / a_s) * np.exp(-L[t0])
    p_coef, q_coef = decay * p_int, decay * q_int

    def f_coeffs(i: int) -> tuple[np.ndarray, np.ndarray]:
        l_i = ems.l[i]
        return -l_i, (1.0 - l_i) * (sigmas[i] / alphas[i])

    cx_s, ce_s = f_coeffs(i_s)
    cx0 = lin * alphas[i_s] - p_coef * cx_s
    ceps = lin * sigmas[i_s] - p_coef * ce_s
    const = -q_coef
    terms: dict[int, list[np.ndarray]] = {}
    if points:
        deltas = [ems.lambdas[j] - ems.lambdas[i_s] for j in points]
        m = derivative_matrix(deltas, pseudo)
        r = [decay * _exp_poly_integral(a_st, lam_st, k) for k in range(1, len(points) + 1)]
        for col, j in enumerate(points):
            w = -sum(r[k] * m[k, col] for k in range(len(points)))
            # g_j - g_s = e^{-S_j} f_j - f_s - B_s(lambda_j)
            cx_j, ce_j = f_coeffs(j)
            scale = w * np.exp(-S[j - lo])
            terms[offsets[j]] = [scale * cx_j, scale * ce_j]
            cx0 = cx0 - w * cx_s
            ceps = ceps - w * ce_s
            const = const - w * b_loc[j - lo]
    base = offsets[i_s]
    all_terms = [(base, cx0, ceps)] + [(o, v[0], v[1]) for o, v in terms.items()]
    return EMSTransition(base, np.asarray(lin), tuple(all_terms), np.asarray(const))


# -------------------------------------------------------------------------------------------------------------
# artifacts
def save_ems(path: str | os.PathLike, ems: EMS) -> Path:
    """Write ``ems`` as safetensors (``lambdas, l, s, b`` in float64) with JSON metadata in the header."""
    from safetensors.torch import save_file

    from .._io import atomic_write

    tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(ems, k))) for k in ("lambdas", "l", "s", "b")}
    meta = {"format": EMS_FORMAT, "version": _VERSION, "meta": json.dumps(ems.meta, sort_keys=True)}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_ems(path: str | os.PathLike) -> EMS:
    """Read an EMS file written by :func:`save_ems`; a missing/corrupt/foreign file is a clear error naming it.

    Tables stored in half precision (float16, bfloat16) or float32 are upcast to float64; other dtypes are refused."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"EMS file {str(p)!r} does not exist; compute one with `fewstep calibrate ems --model ... --out {p.name}`"
        )
    try:
        with safe_open(str(p), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors has its own error types for corrupt files
        raise ValueError(f"{p} is not a readable safetensors file: {exc}") from exc
    if header.get("format") != EMS_FORMAT:
        raise ValueError(f"{p} is not an EMS file (format {header.get('format')!r}, expected {EMS_FORMAT!r})")
    if header.get("version") != _VERSION:
        raise ValueError(
            f"EMS file {str(p)!r}: format version {header.get('version')!r} is not supported (this fewstep reads "
            f"version {_VERSION!r}); estimate the tables again with this fewstep (`fewstep calibrate ems`)"
        )
    missing = [k for k in ("lambdas", "l", "s", "b") if k not in tensors]
    if missing:
        raise ValueError(f"{p} lacks the EMS tensors {missing}")
    arrays = {}
    lambdas_dtype = tensors["lambdas"].dtype
    for name in ("lambdas", "l", "s", "b"):
        try:
            arrays[name] = stored_float64(name, tensors[name], finite=False)
        except ValueError as exc:
            raise ValueError(f"EMS file {str(p)!r}: {exc}") from None
    if arrays["lambdas"].ndim != 1:
        raise ValueError(f"EMS file {str(p)!r}: tensor 'lambdas' must be 1-D (one lambda per grid point), got shape "
                         f"{arrays['lambdas'].shape}")
    text = header.get("meta", "{}")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"EMS file {str(p)!r}: metadata field 'meta' is not valid JSON ({exc}): {text[:80]!r}"
        ) from None
    if not isinstance(meta, dict):
        raise ValueError(f"EMS file {str(p)!r}: metadata field 'meta' must be a JSON object, got {meta!r:.80}")
    try:
        ems = EMS(arrays["lambdas"], arrays["l"], arrays["s"], arrays["b"], meta, lambdas_dtype=lambdas_dtype)
        _check_settings(ems)
    except ValueError as exc:
        raise ValueError(f"EMS file {str(p)!r}: {exc}") from None
    return ems


def _check_settings(ems: EMS) -> None:
    """The estimation settings an EMS file records (``meta["settings"]``, written by ``fewstep calibrate ems``) must
    describe its tensors: ``num_intervals`` + 1 grid points, ``lambda_range`` its first and last lambda (up to the
    stored values' rounding), ``sample_shape`` the shape of one sample of ``l, s, b``. Files without settings pass."""
    settings = ems.meta.get("settings")
    if settings is None:
        return
    if not isinstance(settings, dict):
        raise ValueError(f"metadata 'meta.settings' must be a JSON object (the estimation settings), got "
                         f"{settings!r:.80}")
    fix = "re-estimate them (`fewstep calibrate ems`)"
    if "num_intervals" in settings:
        k = settings["num_intervals"]
        if isinstance(k, bool) or not isinstance(k, int) or k + 1 != ems.num_points:
            raise ValueError(f"meta.settings num_intervals is {k!r}, but the tables hold {ems.num_points} grid points "
                             f"({ems.num_points - 1} intervals); {fix}")
    if "lambda_range" in settings:
        rng = settings["lambda_range"]
        ends = (float(ems.lambdas[0]), float(ems.lambdas[-1]))
        ok = (isinstance(rng, list) and len(rng) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in rng))
        if ok:
            ok = all(abs(v - e) <= 1e-6 * (1.0 + abs(e)) + ems.lambda_resolution for v, e in zip(rng, ends))
        if not ok:
            raise ValueError(f"meta.settings lambda_range is {rng!r:.80}, but `lambdas` run from {ends[0]!r} to "
                             f"{ends[1]!r}; {fix}")
    if "sample_shape" in settings:
        shape = settings["sample_shape"]
        if not isinstance(shape, list) or any(isinstance(v, bool) for v in shape) or shape != list(ems.sample_shape):
            raise ValueError(f"meta.settings sample_shape is {shape!r:.80}, but `l`, `s`, `b` hold samples of shape "
                             f"{list(ems.sample_shape)}; {fix}")
