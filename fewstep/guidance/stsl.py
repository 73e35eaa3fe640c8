"""STSL: second-order Tweedie from a surrogate loss (Rout, Chen, Kumar, Caramanis, Shakkottai, Chu; CVPR 2024).

The first-order plug-in ``p(y | z_t) ~ p(y | z0 = E[z0 | z_t])`` of DPS/PSLD ignores the posterior covariance
``Cov[z0 | z_t] = (sigma^2/alpha^2)(I + sigma^2 grad^2 log p_t(z_t))`` (second-order Tweedie). STSL keeps it
tractable through the trace of the score Jacobian, estimated with random probes (paper eq. 4, Thm. 4.4):

    L(z_t) = ||y - A D(z0_hat(z_t))||  +  (eta / d) * Tr(grad s(z_t)),   s = grad log p_t = -eps_theta / sigma

and ``Tr(grad s)`` comes from the finite-difference Hutchinson estimator with Gaussian probes ``xi ~ N(0, I)``

    Tr(J) ~ (1 / delta) * mean_p  xi_p^T ( s(z + delta xi_p) - s(z) )            (``fd_hutchinson_trace``)

(exact in expectation for a linear ``s``, first-order accurate in ``delta`` otherwise; the paper writes it with
``delta = 1``). Minimising ``L`` pulls ``z_t`` towards measurement consistency *and* towards points where the
posterior of ``z0`` is concentrated (small ``Tr Cov``), where the first-order estimate is trustworthy.

Algorithm 1 per outer step at level ``(alpha_i, sigma_i)``: ``K`` inner iterations ``z <- z - zeta grad L(z)``
(backpropagating through the denoiser and the decoder; fresh probes each time), then one DDIM step from the
updated ``z``. Initialisation: the encoded back-projected measurement pushed through the forward process,
``alpha_0 E(A^+ y) + sigma_0 n`` -- with ``strength < 1`` the run starts part-way down the schedule (the few-step
regime this initialisation is for). PSLD's gluing term is an option (off by default).

The DDIM step (``reuse_eval``): the paper's text does not say whether it re-evaluates the denoiser at the refined
point. ``reuse_eval=True`` (default) uses the last inner iteration's ``eps`` there, ``z0 = (z_K - sigma eps(z_{K-1}))
/ alpha`` -- i.e. ``DDIM(z_{K-1}) - (alpha'/alpha) zeta grad L``, DPS's update order -- and costs no evaluation;
``reuse_eval=False`` spends one more (unbackpropagated) evaluation per step on ``eps(z_K)``. On digits the saved
evaluation buys more outer steps, which is worth more than the fresh ``eps`` (README "Inverse problems"). The
reused form carries the inner move into the next level scaled by ``alpha'/alpha``, which is large in the first
steps of a short run started at pure noise: with ``strength=1`` and 3-5 steps on digits the samples blow up
(|x| 4-190, no NaN); start part-way (``strength < 1``, the tuned defaults) or pass ``reuse_eval=False`` there.

Weight of the trace term (``trace_weight``): ``"constant"`` is the paper's ``eta / d``. Its gradient grows like
``1/sigma^3`` as the noise falls (``Tr grad s ~ -Tr(grad eps)/sigma``), so with one probe it turns into noise that
swamps the measurement gradient at the last levels. ``"tweedie"`` uses ``(eta / d) sigma^4 / alpha^2``: the weight
``Tr(grad s)`` has in ``Tr Cov[z0 | z_t] = (sigma^2/alpha^2)(d + sigma^2 Tr grad s)``, i.e. the surrogate then
penalises ``(eta / d) Tr Cov[z0 | z_t]`` (the Jensen gap ``E||A(z0 - z0_hat)||^2`` with ``A^T A`` replaced by its
mean eigenvalue) -- large at high noise, vanishing as ``sigma -> 0``. ``trace_sigma_min`` turns the term, and its
probe evaluations, off at levels with ``sigma`` below it (where the ``"tweedie"`` weight makes it negligible).

Measurement term: DPS/PSLD's ``||y - A x||`` (``loss="norm"``, default: one step size ``zeta`` serves every task
on digits), or the paper's squared norm ``||y - A x||^2 / 2`` with the inner step ``zeta * alpha_t^2`` -- a step
of size ``zeta`` on ``x0_hat`` (``loss="squared"``, see ``PosteriorMethod``; on digits it needs a per-task
``zeta``: 2 for inpainting, 8 for 2x SR). The paper's ``lambda ~ 1/sigma_y^2`` is absorbed into ``zeta``, so our
``eta`` is relative to a unit-weight measurement term. ``eta = 0`` is a first-order (PSLD-like, K-iteration)
sampler.

Cost per outer step: ``K * (1 + P)`` denoiser evaluations (``P`` probes; ``K`` where the trace term is off), all
backpropagated, plus one unbackpropagated evaluation with ``reuse_eval=False``. Memory: ``probe_batch`` probes are
stacked into one batched call and backpropagated together; smaller values bound the activations kept alive at once
(gradients are accumulated over probe groups).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._checks import check_bool, check_int, check_number
from .posterior import (
    PosteriorMethod,
    PosteriorResult,
    _noise_like,
    as_grid,
    ddim_update,
    first_order_loss,
    tweedie_x0,
)
from .rules import check_same_shape

__all__ = ["STSL", "fd_hutchinson_trace", "stsl_surrogate"]

_SQUARE = "the trace needs a square Jacobian"


def fd_hutchinson_trace(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    probes: torch.Tensor,
    delta: float = 1e-3,
    fx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Finite-difference Hutchinson estimate of ``Tr(d fn / d x)`` per sample (``[N]``).

    ``(1/delta) * mean_p sum_j probes[p, n, j] * (fn(x + delta probes[p])_{n, j} - fn(x)_{n, j})`` for probes
    ``[P, N, ...]`` (Gaussian or Rademacher: any with ``E[xi xi^T] = I``). Differentiable in ``x``. ``fn`` must
    map ``x`` to a tensor of ``x``'s shape (its Jacobian is square), as must ``fx`` (``fn(x)``) when given.
    """
    delta = check_number("delta", delta, low=0.0, low_open=True)
    if not callable(fn):
        raise TypeError(f"`fn` must be callable (x -> a tensor of x's shape), got {type(fn).__name__}")
    for name, value in (("x", x), ("probes", probes)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"`{name}` must be a tensor, got {type(value).__name__}")
    if x.ndim < 1:
        raise ValueError(f"`x` must have a batch dimension ([N, ...]), got shape {tuple(x.shape)}")
    if probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape or probes.shape[0] == 0:
        raise ValueError(f"`probes` must have shape [P, *x.shape] = [P, {tuple(x.shape)}] with P >= 1, got "
                         f"{tuple(probes.shape)}")
    fx = check_same_shape("fx" if fx is not None else "fn(x)", fn(x) if fx is None else fx, "x", x, _SQUARE)
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for xi in probes:
        shifted = check_same_shape("fn(x + delta * probe)", fn(x + delta * xi), "x", x, _SQUARE)
        total = total + (xi * (shifted - fx)).flatten(1).sum(1)
    return total / (delta * probes.shape[0])


def stsl_surrogate(
    measurement_loss: torch.Tensor, trace_estimate: torch.Tensor, eta: float, dim: int
) -> torch.Tensor:
    """``sum_n measurement_loss_n + (eta / d) * sum_n trace_estimate_n`` (paper eq. 4 with lambda absorbed);
    ``eta`` a number >= 0, ``dim`` (``d``, the number of values per sample) an integer >= 1."""
    eta = check_number("eta", eta, 0.0)
    dim = check_int("dim", dim, 1, what="values per sample")
    return measurement_loss.sum() + (eta / dim) * trace_estimate.sum()


@dataclass
class STSL(PosteriorMethod):
    """STSL posterior sampling (see the module docstring).

    ``step_size`` zeta of the inner gradient steps; ``eta`` weight of the trace term (paper 0.02; 0 = first
    order); ``inner_steps`` K (paper 5); ``num_probes`` P per inner step (paper 1); ``probe_scale`` delta of the
    finite difference, in units of the level's ``sigma`` (the probe is ``z + delta * sigma * xi``);
    ``probe_batch`` probes per batched call/backward (``None``: all); ``gluing`` PSLD's gluing weight (0 = off);
    ``init``/``strength`` where sampling starts (default: noised ``A^+ y``, the whole schedule); ``reuse_eval``
    DDIM step with the last inner evaluation (no extra evaluation; ``False``: a fresh one); ``trace_weight``
    ``"constant"`` (paper, ``eta/d``) or ``"tweedie"`` (``eta/d * sigma^4/alpha^2``); ``trace_sigma_min`` no trace
    term (nor probes) at levels with ``sigma`` below it. The defaults are the paper's except two: ``reuse_eval``
    (the paper leaves it open) and ``probe_scale`` (the paper writes the difference with ``delta = 1``, a unit step;
    here it is a small step relative to the level's noise, where the first-order difference is accurate); the tuned
    digits settings are ``fewstep.pipelines.posterior.DEFAULT_OPTIONS["stsl"]``.
    """

    name: ClassVar[str] = "stsl"
    step_size: float = 1.0
    gluing: float = 0.0
    ddim_eta: float = 0.0
    init: str = "adjoint"
    strength: float = 1.0
    loss: str = "norm"
    eta: float = 0.02
    inner_steps: int = 5
    num_probes: int = 1
    probe_scale: float = 0.05
    probe_batch: int | None = None
    reuse_eval: bool = True
    trace_weight: str = "constant"
    trace_sigma_min: float = 0.0

    TRACE_WEIGHTS: ClassVar[tuple[str, ...]] = ("constant", "tweedie")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("reuse_eval", self.reuse_eval)
        if self.trace_weight not in self.TRACE_WEIGHTS:
            raise ValueError(f"`trace_weight` must be one of {list(self.TRACE_WEIGHTS)}, got {self.trace_weight!r}")
        self.trace_sigma_min = check_number("trace_sigma_min", self.trace_sigma_min, low=0.0)
        self.eta = check_number("eta", self.eta, low=0.0)
        self.inner_steps = check_int("inner_steps", self.inner_steps, 1)  # numpy integers stored as int
        self.num_probes = check_int("num_probes", self.num_probes, 1)
        self.probe_scale = check_number("probe_scale", self.probe_scale, low=0.0, low_open=True)
        if self.probe_batch is not None:
            self.probe_batch = check_int("probe_batch", self.probe_batch, 1)

    def evaluations_per_step(self) -> int:
        """Evaluations per outer step at a level where the trace term is on (``K`` fewer probes' worth below
        ``trace_sigma_min``)."""
        probes = self.num_probes if self.eta > 0 else 0
        return self.inner_steps * (1 + probes) + (0 if self.reuse_eval else 1)

    def trace_scale(self, alpha: float, sigma: float) -> float:
        """``eta`` times 1 (``"constant"``) or ``sigma^4 / alpha^2`` (``"tweedie"``): the weight of
        ``Tr(grad s) / d`` in the surrogate at level ``(alpha, sigma)``."""
        return self.eta * (sigma**4 / alpha**2 if self.trace_weight == "tweedie" else 1.0)

    def _inner_grad(self, model_fn, problem, z: torch.Tensor, i: int, alpha: float, sigma: float,
                    generator) -> tuple[torch.Tensor, int, torch.Tensor]:
        """``grad_z L(z)`` at grid point ``i``, the number of evaluations it took and ``eps_theta(z)`` (detached)."""
        dim = z[0].numel()
        use_trace = self.eta > 0 and sigma >= self.trace_sigma_min
        probes = [_noise_like(z, generator) for _ in range(self.num_probes)] if use_trace else []
        delta = self.probe_scale * sigma
        # score s = -eps / sigma:  (eta/d) Tr(grad s) ~ coef * sum_p xi_p . (eps(z + delta xi_p) - eps(z))
        coef = -self.trace_scale(alpha, sigma) / (dim * sigma * delta * max(1, len(probes)))
        group = len(probes) if self.probe_batch is None else self.probe_batch
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            z0, eps = model_fn(zg, i)
            loss = first_order_loss(problem, z0, self.gluing, self.loss)
            if use_trace:
                loss = loss - coef * sum((xi * eps).sum() for xi in probes)
            evals = 1
            if use_trace and group >= len(probes):  # one graph, one backward
                stacked = torch.cat([zg + delta * xi for xi in probes])
                _, eps_p = model_fn(stacked, i)
                loss = loss + coef * (torch.cat(probes) * eps_p).sum()
                evals += len(probes)
                (grad,) = torch.autograd.grad(loss, zg)
                return grad, evals, eps.detach()
            (grad,) = torch.autograd.grad(loss, zg)
            if not use_trace:
                return grad, evals, eps.detach()
            for start in range(0, len(probes), group):  # bounded memory: one probe group's activations at a time
                chunk = probes[start:start + group]
                zc = z.detach().requires_grad_(True)
                _, eps_p = model_fn(torch.cat([zc + delta * xi for xi in chunk]), i)
                part = coef * (torch.cat(chunk) * eps_p).sum()
                grad = grad + torch.autograd.grad(part, zc)[0]
                evals += len(chunk)
        return grad, evals, eps.detach()

    def sample(self, model_fn, problem, noise, alphas, sigmas, generator=None) -> PosteriorResult:
        grid = as_grid(alphas, sigmas)
        z = self.init_latent(problem, noise, grid.alphas[0], grid.sigmas[0]).detach()
        nfe = grad_evals = 0
        for i in range(grid.num_steps):
            a, s, a_n, s_n = grid.alphas[i], grid.sigmas[i], grid.alphas[i + 1], grid.sigmas[i + 1]
            for _ in range(self.inner_steps):
                grad, evals, eps = self._inner_grad(model_fn, problem, z, i, a, s, generator)
                z = (z - self.step_scale(a) * grad).detach()
                nfe += evals
                grad_evals += evals
            with torch.no_grad():
                if self.reuse_eval:  # the last inner evaluation's eps at the refined point: no new evaluation
                    z0 = tweedie_x0(z, eps, a, s)
                else:
                    z0, eps = model_fn(z, i)
                    nfe += 1
                xi = _noise_like(z, generator) if self.ddim_eta > 0 and s_n > 0 else None
                z = ddim_update(z0, eps, a, s, a_n, s_n, self.ddim_eta, xi)
        return PosteriorResult(z.detach(), nfe, grad_evals)

