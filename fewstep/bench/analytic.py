"""Exact (closed-form) denoisers and probability-flow ODE solutions for Gaussian-mixture data.

Conventions
-----------
The forward process is ``x_t = alpha_t * x0 + sigma_t * eps`` with ``eps ~ N(0, I)``.  Writing

    y = x / alpha,        rho = sigma / alpha            ("VP sigma", EDM convention)

turns every schedule (VP, rectified flow with ``alpha = 1 - s, sigma = s``, ...) into the variance-exploding
form ``y = x0 + rho * eps``, whose probability-flow ODE is

    dy / drho = eps_hat(y, rho),        eps_hat(y, rho) = E[eps | y],

independently of the schedule.  For data ``x0 ~ sum_k w_k N(mu_k, diag(s_k^2))`` the posterior is closed form:
given ``y``, component ``k`` has the noisy marginal ``N(mu_k, diag(s_k^2 + rho^2))`` and

    r_k(y)        = softmax_k( log w_k + log N(y; mu_k, diag(s_k^2 + rho^2)) )
    E[x0 | y, k]  = mu_k + s_k^2 / (s_k^2 + rho^2) * (y - mu_k)
    E[eps | y, k] = rho / (s_k^2 + rho^2) * (y - mu_k)
    x0_hat        = sum_k r_k E[x0 | y, k],      eps_hat = sum_k r_k E[eps | y, k].

Internally everything is evaluated in x-space, which is the same formula multiplied through by ``alpha``:

    x | k ~ N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2)),
    E[x0 | x, k]  = mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) * (x - alpha mu_k),
    E[eps | x, k] = sigma / (alpha^2 s_k^2 + sigma^2) * (x - alpha mu_k).

This form is finite at ``rho = 0`` (``eps_hat = 0``) and at ``alpha = 0`` (pure noise, ``x0_hat = E[x0]``).

Everything in this module is computed in float64; it is a reference implementation, not a hot path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .._checks import check_number

__all__ = [
    "PREDICTION_TYPES",
    "AnalyticModel",
    "GaussianMixture",
    "default_mixture",
    "exact_endpoint",
    "exact_solution",
    "mean_reverting_denoise",
    "exact_mean_reverting_solution",
]

#: Prediction types accepted by :class:`AnalyticModel` (aliases map to canonical names).
PREDICTION_TYPES: dict[str, str] = {
    "epsilon": "epsilon",
    "sample": "sample",
    "v_prediction": "v_prediction",
    "flow": "flow",
    "flow_prediction": "flow",
}

_LOG_2PI = math.log(2.0 * math.pi)


def _to_float64_tensor(value: Any, name: str) -> torch.Tensor:
    """Convert a tensor / array / sequence / number to a CPU float64 tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float64)
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be convertible to a float64 array; got {value!r}") from exc


def _check_finite(t: torch.Tensor, name: str) -> None:
    """``ValueError`` naming ``name`` unless every entry of ``t`` is finite (a reference, not a hot path)."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"`{name}` must be finite; got {bad} NaN/Inf entries of {t.numel()}")


def _per_sample(value: Any, n: int, name: str, device: torch.device) -> torch.Tensor:
    """Validate a scalar or per-sample ``[N]`` quantity and return it as float64 ``[N]`` on ``device``."""
    t = _to_float64_tensor(value, name).to(device)
    if t.ndim == 0 or t.numel() == 1:
        t = t.reshape(1).expand(n)
    elif t.ndim != 1 or t.shape[0] != n:
        raise ValueError(
            f"{name} must be a scalar or a 1-D tensor of length N={n}; got shape {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite; got {t.tolist() if n <= 8 else t}")
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0; got minimum {t.min().item()!r}")
    return t


class GaussianMixture:
    """Mixture of axis-aligned Gaussians ``p(x0) = sum_k w_k N(x0; mu_k, diag(s_k^2))`` in float64.

    Args:
        means: ``[K, D]`` component means.
        stds: ``[K]`` (isotropic) or ``[K, D]`` (diagonal) component standard deviations, all ``> 0``.
        weights: ``[K]`` non-negative mixture weights with positive sum (normalised here); uniform if None.

    Attributes:
        means: ``[K, D]`` float64 tensor.
        stds: ``[K, D]`` float64 tensor (isotropic stds are broadcast over D).
        weights: ``[K]`` float64 tensor summing to 1.
    """

    def __init__(self, means: Any, stds: Any, weights: Any | None = None) -> None:
        mu = _to_float64_tensor(means, "means")
        if mu.ndim != 2 or mu.shape[0] < 1 or mu.shape[1] < 1:
            raise ValueError(
                f"means must be a 2-D [K, D] array with K >= 1 and D >= 1; got shape {tuple(mu.shape)}"
            )
        if not bool(torch.isfinite(mu).all()):
            raise ValueError("means must be finite; got non-finite entries")
        k, d = mu.shape

        s = _to_float64_tensor(stds, "stds")
        if s.ndim == 1 and s.shape[0] == k:
            s = s[:, None].expand(k, d).clone()
        elif not (s.ndim == 2 and tuple(s.shape) == (k, d)):
            raise ValueError(
                f"stds must have shape [K]=[{k}] (isotropic) or [K, D]=[{k}, {d}] (diagonal) to match "
                f"means of shape {tuple(mu.shape)}; got shape {tuple(s.shape)}"
            )
        if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise ValueError(f"stds must be finite and > 0; got minimum {s.min().item()!r}")

        if weights is None:
            w = torch.full((k,), 1.0 / k, dtype=torch.float64)
        else:
            w = _to_float64_tensor(weights, "weights")
            if w.ndim != 1 or w.shape[0] != k:
                raise ValueError(
                    f"weights must have shape [K]=[{k}] to match means of shape {tuple(mu.shape)}; "
                    f"got shape {tuple(w.shape)}"
                )
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not w.sum().item() > 0:
                raise ValueError(f"weights must be finite, >= 0 and have a positive sum; got {w.tolist()}")
            w = w / w.sum()

        self.means: torch.Tensor = mu
        self.stds: torch.Tensor = s
        self.weights: torch.Tensor = w

    # ------------------------------------------------------------------ basic properties
    @property
    def num_components(self) -> int:
        """Number of components K."""
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        """Data dimension D."""
        return int(self.means.shape[1])

    def __repr__(self) -> str:
        return f"GaussianMixture(num_components={self.num_components}, dim={self.dim})"

    @classmethod
    def default(cls, dim: int = 2, seed: int = 0, num_components: int = 4) -> GaussianMixture:
        """Alias of :func:`default_mixture`."""
        return default_mixture(dim=dim, seed=seed, num_components=num_components)

    # ------------------------------------------------------------------ moments and sampling
    def mean(self) -> torch.Tensor:
        """Mixture mean ``m = sum_k w_k mu_k``, shape ``[D]``."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Mixture covariance ``sum_k w_k (diag(s_k^2) + mu_k mu_k^T) - m m^T``, shape ``[D, D]``."""
        m = self.mean()
        second = torch.diag(self.weights @ self.stds.square())
        second = second + (self.means * self.weights[:, None]).T @ self.means
        cov = second - torch.outer(m, m)
        return 0.5 * (cov + cov.T)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples ``x0 ~ p``; returns a float64 CPU tensor ``[n, D]``."""
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer; got {n!r}")
        n = int(n)
        if n == 0:
            return torch.empty(0, self.dim, dtype=torch.float64)
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[idx] + self.stds[idx] * noise

    # ------------------------------------------------------------------ posterior
    def _check_points(self, x: Any, name: str) -> torch.Tensor:
        t = x if isinstance(x, torch.Tensor) else _to_float64_tensor(x, name)
        if t.ndim != 2 or t.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape [N, D] with D={self.dim}; got shape {tuple(t.shape)}")
        t = t.detach().to(torch.float64)
        _check_finite(t, name)
        return t

    def _log_lik_x(
        self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-component ``log w_k + log N(x; alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))``.

        Returns ``(logits [N, K], diff [N, K, D], var [N, K, D])`` with ``diff = x - alpha mu_k``.
        """
        mu = self.means.to(x.device)
        s2 = self.stds.to(x.device).square()
        a = alpha[:, None, None]
        var = a.square() * s2[None] + sigma[:, None, None].square()
        if bool((var <= 0).any()):
            raise ValueError("alpha and sigma must not both be 0 (the noisy marginal would be degenerate)")
        diff = x[:, None, :] - a * mu[None]
        log_n = -0.5 * (diff.square() / var + torch.log(var) + _LOG_2PI).sum(-1)
        logits = log_n + torch.log(self.weights.to(x.device))[None]
        return logits, diff, var

    def _posterior_x(
        self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact ``(E[x0|x], E[eps|x], responsibilities)`` for ``x = alpha x0 + sigma eps`` (see module doc)."""
        logits, diff, var = self._log_lik_x(x, alpha, sigma)
        resp = torch.softmax(logits, dim=-1)  # [N, K]
        r = resp[:, :, None]
        a = alpha[:, None, None]
        s2 = self.stds.to(x.device).square()[None]
        x0_k = self.means.to(x.device)[None] + (a * s2 / var) * diff
        eps_k = (sigma[:, None, None] / var) * diff
        return (r * x0_k).sum(1), (r * eps_k).sum(1), resp

    def posterior(self, y: Any, rho: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact posterior means for ``y = x0 + rho * eps``.

        Args:
            y: ``[N, D]`` noisy points (float64 used internally).
            rho: float, 0-d tensor or ``[N]`` tensor of noise levels, ``rho >= 0``.

        Returns:
            ``(x0_hat, eps_hat)``, each float64 ``[N, D]``, with ``x0_hat = E[x0 | y]``,
            ``eps_hat = E[eps | y]`` and ``y = x0_hat + rho * eps_hat``.  At ``rho = 0``: ``eps_hat = 0``.
        """
        yy = self._check_points(y, "y")
        r = _per_sample(rho, yy.shape[0], "rho", yy.device)
        x0_hat, eps_hat, _ = self._posterior_x(yy, torch.ones_like(r), r)
        return x0_hat, eps_hat

    def responsibilities(self, y: Any, rho: Any) -> torch.Tensor:
        """Posterior component probabilities ``r_k(y) = P(k | y)`` for ``y = x0 + rho * eps``, ``[N, K]``."""
        yy = self._check_points(y, "y")
        r = _per_sample(rho, yy.shape[0], "rho", yy.device)
        logits, _, _ = self._log_lik_x(yy, torch.ones_like(r), r)
        return torch.softmax(logits, dim=-1)

    def log_prob(self, y: Any, rho: Any = 0.0) -> torch.Tensor:
        """Log density ``log p_rho(y)`` of ``y = x0 + rho * eps`` (``rho = 0``: the data density), ``[N]``.

        Differentiable w.r.t. ``y`` when ``y`` is a float64 tensor; Tweedie: ``eps_hat = -rho grad_y log p_rho``.
        """
        yy = y if isinstance(y, torch.Tensor) else self._check_points(y, "y")
        if yy.ndim != 2 or yy.shape[1] != self.dim:
            raise ValueError(f"y must have shape [N, D] with D={self.dim}; got shape {tuple(yy.shape)}")
        yy = yy.to(torch.float64)
        r = _per_sample(rho, yy.shape[0], "rho", yy.device)
        logits, _, _ = self._log_lik_x(yy, torch.ones_like(r), r)
        return torch.logsumexp(logits, dim=-1)

    def denoise(self, x: Any, alpha: Any, sigma: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact posterior means for ``x = alpha * x0 + sigma * eps``.

        Equivalent to :meth:`posterior` with ``y = x / alpha`` and ``rho = sigma / alpha``, but evaluated
        directly in x-space so that ``alpha = 0`` (pure noise) is also allowed.

        Args:
            x: ``[N, D]`` noisy points.
            alpha, sigma: floats, 0-d or ``[N]`` tensors, ``>= 0`` and not both zero.

        Returns:
            ``(x0_hat, eps_hat)`` float64 ``[N, D]`` with ``x = alpha * x0_hat + sigma * eps_hat``.
        """
        xx = self._check_points(x, "x")
        a = _per_sample(alpha, xx.shape[0], "alpha", xx.device)
        s = _per_sample(sigma, xx.shape[0], "sigma", xx.device)
        x0_hat, eps_hat, _ = self._posterior_x(xx, a, s)
        return x0_hat, eps_hat


    def eps_differentiable(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``E[eps | x]`` without detaching or host checks: differentiable (also forward-mode, for the JVPs of
        DPM-Solver-v3's EMS estimation) in ``x``, ``alpha`` and ``sigma`` (0-d tensors)."""
        n = x.shape[0]
        a = alpha.to(x.dtype).reshape(1).expand(n)
        s = sigma.to(x.dtype).reshape(1).expand(n)
        mu = self.means.to(x.device, x.dtype)
        s2 = self.stds.to(x.device, x.dtype).square()
        var = a[:, None, None].square() * s2[None] + s[:, None, None].square()
        diff = x[:, None, :] - a[:, None, None] * mu[None]
        log_n = -0.5 * (diff.square() / var + torch.log(var)).sum(-1)
        resp = torch.softmax(log_n + torch.log(self.weights.to(x.device, x.dtype))[None], dim=-1)
        return (resp[:, :, None] * (s[:, None, None] / var) * diff).sum(1)


def default_mixture(dim: int = 2, seed: int = 0, num_components: int = 4) -> GaussianMixture:
    """A smooth, wide mixture for order-of-convergence tests, deterministic in ``(dim, seed)``.

    ``num_components`` (default 4) components with means ``~ N(0, 1.5^2 I)`` (order 1, spread out),
    isotropic stds uniform in ``[0.5, 1.0]`` (wide, so the PF-ODE solution is smooth) and weights uniform
    in ``[0.5, 1.0]`` before normalisation.
    """
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer; got {dim!r}")
    if int(num_components) != num_components or num_components < 1:
        raise ValueError(f"num_components must be a positive integer; got {num_components!r}")
    rng = np.random.default_rng(seed)
    k = int(num_components)
    means = rng.normal(0.0, 1.5, size=(k, int(dim)))
    stds = rng.uniform(0.5, 1.0, size=k)
    weights = rng.uniform(0.5, 1.0, size=k)
    return GaussianMixture(means, stds, weights)


class _Config(dict):
    """A dict whose keys are also readable as attributes (like diffusers' ``FrozenDict``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class AnalyticModel(torch.nn.Module):
    """Diffusers-style model whose output is the exact Gaussian-mixture denoiser.

    ``forward(sample, timestep)`` evaluates ``alpha, sigma = schedule.alpha_sigma(timestep)``, the exact
    ``x0_hat, eps_hat`` for ``sample = alpha x0 + sigma eps`` and returns, by ``prediction_type``:

    * ``"epsilon"``: ``eps_hat``
    * ``"sample"``: ``x0_hat``
    * ``"v_prediction"``: ``alpha * eps_hat - sigma * x0_hat``
    * ``"flow"`` (alias ``"flow_prediction"``): ``eps_hat - x0_hat``, the rectified-flow velocity ``dx/ds``
      for ``x = (1 - s) x0 + s eps``.

    Args:
        mixture: the data distribution.
        schedule: any object with ``alpha_sigma(t) -> (alpha, sigma)`` (numpy float64, continuous in model
            timesteps ``t``) and ``num_train_timesteps``.
        prediction_type: one of :data:`PREDICTION_TYPES`.
    """

    def __init__(self, mixture: GaussianMixture, schedule: Any, prediction_type: str = "epsilon") -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {prediction_type!r} is not supported; allowed values: "
                f"{sorted(PREDICTION_TYPES)}"
            )
        self.mixture = mixture
        self.schedule = schedule
        self.prediction_type = PREDICTION_TYPES[prediction_type]
        self.config = _Config(
            prediction_type=self.prediction_type,
            num_train_timesteps=int(getattr(schedule, "num_train_timesteps", 1000)),
            sample_size=mixture.dim,
        )

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (always float64)."""
        return torch.float64

    @property
    def device(self) -> torch.device:
        """Compute device (CPU; inputs on other devices are moved and results moved back)."""
        return torch.device("cpu")

    def _timestep_range(self) -> str:
        """The schedule's model-time range, for error messages."""
        low, high = getattr(self.schedule, "t_min", None), getattr(self.schedule, "t_max", None)
        if isinstance(low, (int, float)) and isinstance(high, (int, float)):
            return f"[{low:g}, {high:g}]"
        return f"[0, {self.config.num_train_timesteps}]"

    def _alpha_sigma(self, timestep: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        allowed = f"a scalar or a 1-D tensor of length N={n}, finite timesteps in {self._timestep_range()}"
        try:
            if isinstance(timestep, torch.Tensor):
                t = timestep.detach().cpu().to(torch.float64).numpy()
            else:
                t = np.asarray(timestep, dtype=np.float64)  # None -> NaN: refused below
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"`timestep` must be {allowed}; got {timestep!r}") from None
        if t.ndim == 0 or t.size == 1:
            t = np.full((n,), float(t.reshape(())), dtype=np.float64)
        elif t.ndim != 1 or t.shape[0] != n:
            raise ValueError(f"`timestep` must be {allowed}; got shape {tuple(t.shape)}")
        if not np.isfinite(t).all():
            raise ValueError(f"`timestep` must be {allowed}; got {timestep!r}")
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # out of range: reported below
            alpha, sigma = self.schedule.alpha_sigma(t)
        alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (n,))
        sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (n,))
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(alpha) & np.isfinite(sigma) & (alpha >= 0) & (sigma >= 0) & (alpha + sigma > 0)
        if not ok.all():
            i = int(np.argmin(ok))
            raise ValueError(
                f"`timestep` {t[i]:g} is outside the schedule's range: its alpha_sigma gives "
                f"alpha={float(alpha[i])!r}, sigma={float(sigma[i])!r} there (a model needs finite alpha, sigma >= 0, "
                f"not both 0); give timesteps in {self._timestep_range()}"
            )
        return torch.from_numpy(alpha.copy()), torch.from_numpy(sigma.copy())

    def forward(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        """Model output for ``sample`` (``[N, D]`` or any ``[N, ...]`` with ``prod(...) = D``) at ``timestep``."""
        if sample.ndim < 2:
            raise ValueError(f"sample must have shape [N, D] or [N, ...]; got shape {tuple(sample.shape)}")
        n = sample.shape[0]
        # explicit feature count: reshape(n, -1) is ambiguous for an empty batch
        x = sample.detach().to(device="cpu", dtype=torch.float64).reshape(n, math.prod(sample.shape[1:]))
        if x.shape[1] != self.mixture.dim:
            raise ValueError(
                f"sample of shape {tuple(sample.shape)} flattens to {x.shape[1]} features per item; "
                f"the mixture has D={self.mixture.dim}"
            )
        _check_finite(x, "sample")
        alpha, sigma = self._alpha_sigma(timestep, n)
        x0_hat, eps_hat = self.mixture.denoise(x, alpha, sigma)
        a, s = alpha[:, None], sigma[:, None]
        if self.prediction_type == "epsilon":
            out = eps_hat
        elif self.prediction_type == "sample":
            out = x0_hat
        elif self.prediction_type == "v_prediction":
            out = a * eps_hat - s * x0_hat
        else:  # "flow"
            out = eps_hat - x0_hat
        return out.reshape(sample.shape).to(device=sample.device, dtype=sample.dtype)


# ---------------------------------------------------------------------- exact PF-ODE solutions
def _flatten_points(mixture: GaussianMixture, x: Any, name: str) -> tuple[torch.Tensor, torch.Size]:
    t = x if isinstance(x, torch.Tensor) else _to_float64_tensor(x, name)
    if t.ndim < 2:
        raise ValueError(f"{name} must have shape [N, D] or [N, ...]; got shape {tuple(t.shape)}")
    shape = t.shape
    # explicit feature count: reshape(N, -1) is ambiguous for an empty batch
    flat = t.detach().to(device="cpu", dtype=torch.float64).reshape(shape[0], math.prod(shape[1:]))
    if flat.shape[1] != mixture.dim:
        raise ValueError(
            f"{name} of shape {tuple(shape)} has {flat.shape[1]} features per item; the mixture has "
            f"D={mixture.dim}"
        )
    _check_finite(flat, name)
    return flat, shape


def _solve(fun: Any, t0: float, t1: float, y0: np.ndarray, rtol: float, atol: float, what: str) -> np.ndarray:
    # scipy raises a tiny rtol to ~2e-14 with a warning, and never finishes with a NaN one: check both here
    check_number("rtol", rtol, 1e-13, high=1.0)
    check_number("atol", atol, 0, low_open=True)
    sol = solve_ivp(fun, (t0, t1), y0, method="DOP853", rtol=rtol, atol=atol, t_eval=None, dense_output=False)
    if not sol.success:
        raise RuntimeError(
            f"solve_ivp (DOP853) failed integrating {what} from {t0!r} to {t1!r}: {sol.message}"
        )
    return sol.y[:, -1]


def exact_endpoint(
    mixture: GaussianMixture,
    x_start: Any,
    rho_start: float,
    rho_end: float = 0.0,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """Exact PF-ODE solution in y-space.

    Integrates ``dy/drho = eps_hat(y, rho)`` (exact mixture posterior noise) from ``rho_start`` down to
    ``rho_end`` with ``scipy.integrate.solve_ivp(method="DOP853")``.  All samples are integrated jointly
    (scipy's RMS error norm is over the whole batch).

    Args:
        mixture: data distribution.
        x_start: ``y(rho_start)``, shape ``[N, D]`` (or ``[N, ...]`` flattening to D).
        rho_start, rho_end: noise levels with ``rho_start > rho_end >= 0`` (finite).
        rtol, atol: solver tolerances.

    Returns:
        ``y(rho_end)`` as a float64 tensor with the shape of ``x_start``.
    """
    rho_start, rho_end = float(rho_start), float(rho_end)
    if not (math.isfinite(rho_start) and math.isfinite(rho_end) and rho_start > rho_end >= 0.0):
        raise ValueError(
            f"need finite rho_start > rho_end >= 0; got rho_start={rho_start!r}, rho_end={rho_end!r}"
        )
    y0, shape = _flatten_points(mixture, x_start, "x_start")
    n, d = y0.shape
    if n == 0:
        return y0.reshape(shape)
    ones = torch.ones(n, dtype=torch.float64)

    def rhs(rho: float, y: np.ndarray) -> np.ndarray:
        _, eps_hat, _ = mixture._posterior_x(torch.from_numpy(y).reshape(n, d), ones, ones * rho)
        return eps_hat.reshape(-1).numpy()

    y_end = _solve(rhs, rho_start, rho_end, y0.reshape(-1).numpy().copy(), rtol, atol, "dy/drho = eps_hat")
    return torch.from_numpy(y_end.copy()).reshape(shape)


def _exact_endpoint_angle(
    mixture: GaussianMixture,
    x_start: torch.Tensor,
    alpha_sigma_start: tuple[float, float],
    alpha_sigma_end: tuple[float, float],
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """PF-ODE in the angle parametrisation ``alpha = cos(theta), sigma = sin(theta)`` ([N, D] float64 in/out).

    With ``z = x / hypot(alpha, sigma) = cos(theta) x0 + sin(theta) eps`` the PF-ODE reads
    ``dz/dtheta = cos(theta) eps_hat - sin(theta) x0_hat`` (the v-prediction), which is regular on the
    whole interval ``[0, pi/2]`` and therefore also covers ``alpha_start = 0`` (``rho_start = inf``).
    """
    a0, s0 = alpha_sigma_start
    a1, s1 = alpha_sigma_end
    th0, th1 = math.atan2(s0, a0), math.atan2(s1, a1)
    r0, r1 = math.hypot(a0, s0), math.hypot(a1, s1)
    n, d = x_start.shape
    ones = torch.ones(n, dtype=torch.float64)

    def rhs(theta: float, z: np.ndarray) -> np.ndarray:
        c, s = math.cos(theta), math.sin(theta)
        x0_hat, eps_hat, _ = mixture._posterior_x(torch.from_numpy(z).reshape(n, d), ones * c, ones * s)
        return (c * eps_hat - s * x0_hat).reshape(-1).numpy()

    z0 = (x_start / r0).reshape(-1).numpy().copy()
    z1 = _solve(rhs, th0, th1, z0, rtol, atol, "dz/dtheta = v_hat")
    return r1 * torch.from_numpy(z1.copy()).reshape(n, d)


def exact_solution(
    mixture: GaussianMixture,
    schedule: Any,
    x_T: Any,
    t_start: float,
    alpha_sigma_end: Sequence[float] = (1.0, 0.0),
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """Exact PF-ODE solution in x-space.

    ``alpha_s, sigma_s = schedule.alpha_sigma(t_start)``; ``x_T`` is converted to ``y = x_T / alpha_s`` at
    ``rho = sigma_s / alpha_s``, integrated with :func:`exact_endpoint` to ``rho_end = sigma_end / alpha_end``
    and returned as ``x_end = alpha_end * y_end``.  If ``alpha_s == 0`` (e.g. rectified flow at ``t = T``,
    ``rho = inf``) the equivalent, regular angle form ``dz/dtheta = cos(theta) eps_hat - sin(theta) x0_hat``
    with ``z = x / hypot(alpha, sigma)`` and ``theta = atan2(sigma, alpha)`` is integrated instead.

    Args:
        mixture: data distribution.
        schedule: object with ``alpha_sigma(t)``.
        x_T: ``[N, D]`` (or ``[N, ...]``) state at model time ``t_start`` (a single scalar time).
        t_start: model timestep of ``x_T``.
        alpha_sigma_end: ``(alpha_end, sigma_end)`` of the target, ``alpha_end > 0``; default clean data.
        rtol, atol: solver tolerances.

    Returns:
        float64 tensor ``x_end`` with the shape of ``x_T``.
    """
    if isinstance(t_start, torch.Tensor):
        if t_start.numel() != 1:
            raise ValueError(f"t_start must be a single scalar timestep; got shape {tuple(t_start.shape)}")
        t_start = float(t_start.detach().cpu().reshape(()))
    t_start = check_number("t_start", t_start)
    a_s, s_s = schedule.alpha_sigma(np.asarray([float(t_start)], dtype=np.float64))
    a_s, s_s = float(np.asarray(a_s).reshape(-1)[0]), float(np.asarray(s_s).reshape(-1)[0])
    if len(alpha_sigma_end) != 2:
        raise ValueError(f"alpha_sigma_end must be a pair (alpha_end, sigma_end); got {alpha_sigma_end!r}")
    a_e, s_e = float(alpha_sigma_end[0]), float(alpha_sigma_end[1])
    if not (a_s >= 0 and s_s >= 0 and a_s + s_s > 0 and math.isfinite(a_s) and math.isfinite(s_s)):
        raise ValueError(
            f"schedule.alpha_sigma({t_start!r}) gave alpha={a_s!r}, sigma={s_s!r}; need finite values >= 0 "
            "that are not both 0"
        )
    if not (a_e > 0 and s_e >= 0 and math.isfinite(a_e) and math.isfinite(s_e)):
        raise ValueError(f"alpha_sigma_end must have alpha_end > 0 and sigma_end >= 0; got {(a_e, s_e)!r}")
    x, shape = _flatten_points(mixture, x_T, "x_T")
    rho_end = s_e / a_e
    if a_s == 0.0:
        return _exact_endpoint_angle(mixture, x, (a_s, s_s), (a_e, s_e), rtol, atol).reshape(shape)
    rho_start = s_s / a_s
    if not rho_start > rho_end:
        raise ValueError(
            f"the start must be noisier than the end: rho_start = sigma/alpha = {rho_start!r} at "
            f"t_start={t_start!r}, rho_end = {rho_end!r} from alpha_sigma_end={(a_e, s_e)!r}"
        )
    y_end = exact_endpoint(mixture, x / a_s, rho_start, rho_end, rtol=rtol, atol=atol)
    return (a_e * y_end).reshape(shape)


def _check_mr(lam: float, a: float, name: str) -> tuple[float, float]:
    lam, a = float(lam), float(a)
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"`lam` (the MR-SDE's stationary std) must be a finite number > 0, got {lam!r}")
    if not 0.0 < a <= 1.0:
        raise ValueError(f"`{name}` (the MR decay a_t = exp(-int theta)) must lie in (0, 1], got {a!r}")
    return lam, a


def mean_reverting_denoise(
    mixture: GaussianMixture, x: Any, mu: Any, a: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(E[x0 | x_t, mu], E[eps | x_t, mu])`` under the mean-reverting marginal (Li et al. 2025, eq. 4).

    ``x_t = a x0 + (1 - a) mu + s eps`` with ``s = lam sqrt(1 - a^2)`` and ``x0 ~ mixture`` independent of
    ``mu``: ``x_t - (1 - a) mu = a x0 + s eps`` is an ordinary ``(alpha, sigma) = (a, s)`` observation of ``x0``.
    """
    lam, a = _check_mr(lam, a, "a")
    xx = mixture._check_points(x, "x")
    mm = mixture._check_points(mu, "mu")
    if mm.shape != xx.shape:
        raise ValueError(f"`mu` must have the shape of `x` {tuple(xx.shape)}, got {tuple(mm.shape)}")
    s = lam * math.sqrt(max(1.0 - a * a, 0.0))
    return mixture.denoise(xx - (1.0 - a) * mm, a, s)


def exact_mean_reverting_solution(
    mixture: GaussianMixture,
    x_start: Any,
    mu: Any,
    lam: float,
    a_start: float,
    a_end: float,
    rtol: float = 1e-10,
    atol: float = 1e-10,
) -> torch.Tensor:
    """Exact endpoint of the mean-reverting PF-ODE ``dx/dt = theta (mu - x) + g^2/(2 s) eps_hat``.

    With ``Y = (x - (1 - a) mu) / a`` and ``rho = s / a`` the MR PF-ODE becomes ``dY/drho = eps_hat`` -- the
    same variance-exploding form as every other schedule (module docstring) -- so :func:`exact_endpoint`
    integrates it; ``a_start < a_end`` (noisier start).
    """
    lam, a_s = _check_mr(lam, a_start, "a_start")
    _, a_e = _check_mr(lam, a_end, "a_end")
    if not a_s < a_e:
        raise ValueError(f"the start must be noisier than the end: need a_start < a_end, got {a_s} and {a_e}")
    flat, shape = _flatten_points(mixture, x_start, "x_start")
    mm, _ = _flatten_points(mixture, mu, "mu")
    if mm.shape != flat.shape:
        raise ValueError(f"`mu` must have the shape of `x_start` {tuple(shape)}")

    def rho(a: float) -> float:
        return lam * math.sqrt(max(1.0 - a * a, 0.0)) / a

    y = (flat - (1.0 - a_s) * mm) / a_s
    y_end = exact_endpoint(mixture, y, rho(a_s), rho(a_e), rtol=rtol, atol=atol)
    return (a_e * y_end + (1.0 - a_e) * mm).reshape(shape)
