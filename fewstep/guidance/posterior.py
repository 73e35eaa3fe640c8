"""Posterior sampling for linear inverse problems ``y = A D(z0) + n`` with a VP diffusion prior: the shared math
and the first-order Tweedie baselines DPS and PSLD.

Notation: the prior samples ``z`` (pixels for a pixel model, latents for a latent model), ``x_t = alpha z0 +
sigma eps``; ``D`` is the decoder into the operator's image space (identity for pixel models, the VAE decoder for
latent ones) and ``E`` the encoder. Every method sees the model through ``model_fn(z, i) -> (z0_hat, eps_hat)``
(grid point ``i``, DESIGN contract 2), differentiable in ``z``.

* **Tweedie** (first order): ``z0_hat = (z_t - sigma eps_theta(z_t)) / alpha`` -- the posterior mean E[z0 | z_t].
* **DPS** (Chung et al. 2023, Alg. 1): after each DDIM/DDPM step, ``z' <- z' - zeta grad_{z_t} ||y - A D(z0_hat)||``
  -- the gradient goes *through the denoiser* (one backward pass per step; the norm, not its square, as in the
  paper's implementation, so ``zeta`` is scale free).
* **PSLD** (Rout et al. 2023, eq. 8; ``psld.py``): DPS in latent space plus the *gluing* term
  ``gamma ||E(A^T y + (I - A^T A) D(z0_hat)) - z0_hat||``, which asks the latent ``z0_hat`` to be a fixed point of
  "decode, replace the measured part by the measurement, encode". With ``D = E = identity`` it reduces to
  ``||A^T (y - A z0_hat)||``.
* The outer step is DDIM (Song et al. 2021, eq. 12): ``z_next = alpha' z0 + sqrt(sigma'^2 - c^2) eps + c xi`` with
  ``c = ddim_eta * (sigma'/sigma) sqrt(1 - alpha^2/alpha'^2)``; ``ddim_eta = 1`` is DDPM's ancestral step.

STSL (the second-order surrogate) lives in ``fewstep.guidance.stsl`` and reuses these pieces.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from diffusers.utils.torch_utils import randn_tensor

from .._checks import check_number
from .operators import MeasurementOperator

__all__ = [
    "ModelFn",
    "InverseProblem",
    "PosteriorMethod",
    "PosteriorResult",
    "DPS",
    "PSLD",
    "tweedie_x0",
    "ddim_update",
    "measurement_residual",
    "gluing_residual",
    "first_order_loss",
]

#: ``model_fn(z, i) -> (z0_hat, eps_hat)`` at grid point ``i`` (differentiable in ``z``)
ModelFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def tweedie_x0(z_t: torch.Tensor, eps: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """First-order Tweedie estimate ``E[z0 | z_t] = (z_t - sigma eps) / alpha`` for an epsilon-prediction."""
    return (z_t - sigma * eps) / alpha


def ddim_update(
    z0: torch.Tensor,
    eps: torch.Tensor,
    alpha: float,
    sigma: float,
    alpha_next: float,
    sigma_next: float,
    ddim_eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM step from level ``(alpha, sigma)`` to ``(alpha_next, sigma_next)`` (Song et al. 2021, eq. 12).

    With ``alpha_bar = alpha^2`` and ``1 - alpha_bar = sigma^2``, the paper's ``sigma_t(eta)`` is
    ``c = ddim_eta * (sigma_next/sigma) * sqrt(1 - (alpha/alpha_next)^2)``; returns
    ``alpha_next z0 + sqrt(sigma_next^2 - c^2) eps + c noise`` (``noise`` needed when ``c > 0``).

    ``alpha``, ``sigma``, ``alpha_next``, ``sigma_next`` must be finite and ``>= 0`` and ``ddim_eta`` finite and
    ``>= 0`` (``eta > 1`` is capped at ``c = sigma_next``); they are checked when given as numbers (host floats,
    free to check), passed on unchecked when given as tensors.
    """
    levels = {"alpha": alpha, "sigma": sigma, "alpha_next": alpha_next, "sigma_next": sigma_next}
    for name, value in levels.items():
        if not isinstance(value, torch.Tensor):
            check_number(name, value, 0.0)
    if not isinstance(ddim_eta, torch.Tensor):
        ddim_eta = check_number("ddim_eta", ddim_eta, 0.0)
    ratio = (alpha / alpha_next) ** 2 if alpha_next > 0 else 1.0
    c = ddim_eta * (sigma_next / sigma) * math.sqrt(max(0.0, 1.0 - ratio)) if sigma > 0 else 0.0
    c = min(c, sigma_next)
    out = alpha_next * z0 + math.sqrt(max(0.0, sigma_next**2 - c**2)) * eps
    if c > 0:
        if noise is None:
            raise ValueError(f"`noise` is needed for a stochastic DDIM step (ddim_eta={ddim_eta!r})")
        out = out + c * noise
    return out


@dataclass
class InverseProblem:
    """``y = A D(z0) + n``: the operator ``A``, the measurement ``y`` and the decoder/encoder between the prior's
    space and the operator's image space (``None``: identity, pixel-space models)."""

    operator: MeasurementOperator
    measurement: torch.Tensor
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.operator, MeasurementOperator):
            raise TypeError(f"`operator` must be a MeasurementOperator, got {type(self.operator).__name__}")
        if not isinstance(self.measurement, torch.Tensor):
            raise TypeError(f"`measurement` must be a tensor, got {type(self.measurement).__name__}")
        if not torch.isfinite(self.measurement).all():
            raise ValueError("`measurement` contains NaN or Inf")

    @property
    def latent(self) -> bool:
        return self.decode is not None

    def to_image(self, z: torch.Tensor) -> torch.Tensor:
        return (self.decode or _identity)(z)

    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        return (self.encode or _identity)(x)


def measurement_residual(problem: InverseProblem, image: torch.Tensor) -> torch.Tensor:
    """``||y - A x||_2`` per image (``[N]``)."""
    y = problem.measurement.to(device=image.device, dtype=image.dtype)
    return (y - problem.operator(image)).flatten(1).norm(dim=1)


def gluing_residual(problem: InverseProblem, z0: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """PSLD's gluing term ``||E(A^T y + (I - A^T A) x) - z0||_2`` per image, ``x = D(z0)`` given as ``image``."""
    op = problem.operator
    y = problem.measurement.to(device=image.device, dtype=image.dtype)
    glued = op.adjoint(y) + image - op.adjoint(op(image))
    return (problem.to_latent(glued) - z0).flatten(1).norm(dim=1)


LOSSES = ("norm", "squared")


def first_order_loss(
    problem: InverseProblem, z0: torch.Tensor, gluing: float = 0.0, loss: str = "norm"
) -> torch.Tensor:
    """``sum_n ||y - A D(z0_n)|| + gluing * ||E(A^T y + (I - A^T A) D(z0_n)) - z0_n||`` (a scalar); with
    ``loss="squared"`` each norm ``r`` is replaced by ``r^2 / 2``. ``gluing`` must be a finite number >= 0."""
    if not isinstance(problem, InverseProblem):
        raise TypeError(f"`problem` must be an InverseProblem, got {type(problem).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {list(LOSSES)}, got {loss!r}")
    gluing = check_number("gluing", gluing, 0.0)
    image = problem.to_image(z0)
    power = 2 if loss == "squared" else 1
    scale = 0.5 if loss == "squared" else 1.0
    total = scale * (measurement_residual(problem, image) ** power).sum()
    if gluing:
        total = total + gluing * scale * (gluing_residual(problem, z0, image) ** power).sum()
    return total


@dataclass
class PosteriorResult:
    """The final sample (prior space), the number of denoiser forward evaluations on the batch (``nfe``; each
    probe counts as one) and of those that were backpropagated (``grad_evals``)."""

    sample: torch.Tensor
    nfe: int
    grad_evals: int


@dataclass
class Grid:
    """``alphas``/``sigmas`` of the ``N`` evaluation points plus the final target (host floats)."""

    alphas: list[float]
    sigmas: list[float]

    @property
    def num_steps(self) -> int:
        return len(self.alphas) - 1


def as_grid(alphas, sigmas) -> Grid:
    """Validate a VP grid: ``N + 1`` levels, ``sigma > 0`` at the ``N`` evaluation points, ``alpha > 0``."""
    a = [float(v) for v in alphas]
    s = [float(v) for v in sigmas]
    if len(a) != len(s) or len(a) < 2:
        raise ValueError(f"a grid needs N + 1 >= 2 alphas and sigmas of one length, got {len(a)} and {len(s)}")
    if any(not math.isfinite(v) or v <= 0 for v in a) or any(not math.isfinite(v) or v <= 0 for v in s[:-1]):
        raise ValueError("grid alphas must be > 0 and sigmas > 0 at every evaluation point")
    return Grid(a, s)


@dataclass
class PosteriorMethod:
    """Base class of posterior samplers: ``sample(model_fn, problem, z_T, alphas, sigmas, generator)``.

    ``step_size`` (``zeta``) scales the measurement gradient; ``gluing`` (``gamma``) weights PSLD's gluing term
    (0 = off); ``ddim_eta`` is the outer step's stochasticity (1 = DDPM ancestral, 0 = deterministic DDIM).
    ``loss``: ``"norm"`` -- ``||y - A x0_hat||`` with the step ``zeta`` (DPS's implementation, scale free), or
    ``"squared"`` -- ``||y - A x0_hat||^2 / 2`` with the step ``zeta * alpha_t^2``: since ``dx0_hat/dz ~ I/alpha_t``
    that is a gradient step of size ``zeta`` on ``x0_hat`` itself (``zeta = 1`` refills the observed pixels of an
    inpainting problem), so repeated inner iterations converge instead of oscillating.
    """

    name: ClassVar[str] = ""
    INITS: ClassVar[tuple[str, ...]] = ("noise", "adjoint")
    step_size: float = 1.0
    gluing: float = 0.0
    ddim_eta: float = 1.0
    init: str = "noise"
    strength: float = 1.0
    loss: str = "norm"

    def __post_init__(self) -> None:
        self.step_size = check_number("step_size", self.step_size, low=0.0)
        self.gluing = check_number("gluing", self.gluing, low=0.0)
        self.ddim_eta = check_number("ddim_eta", self.ddim_eta, low=0.0, high=1.0)
        self.strength = check_number("strength", self.strength, low=0.0, high=1.0, low_open=True)
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.init not in self.INITS:
            raise ValueError(f"`init` must be one of {list(self.INITS)}, got {self.init!r}")
        if self.init == "noise" and self.strength != 1.0:
            raise ValueError(
                f"`strength`={self.strength!r} < 1 starts part-way down the noise schedule and needs init='adjoint' "
                "(noised A^T y); pure noise is only a valid start at strength 1"
            )

    def config(self) -> dict:
        from dataclasses import asdict

        return {"method": self.name, **asdict(self)}

    def step_scale(self, alpha: float) -> float:
        """The multiplier of the loss gradient at a level with ``alpha`` (see ``loss``)."""
        return self.step_size * (alpha * alpha if self.loss == "squared" else 1.0)

    def evaluations_per_step(self) -> int:
        """Denoiser forward evaluations per outer step."""
        return 1

    def init_latent(self, problem: InverseProblem, noise: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """The starting point at the first grid level: ``noise`` (``init="noise"``), or the encoded back-projected
        measurement pushed through the forward process, ``alpha E(A^+ y) + sigma noise`` (``init="adjoint"``,
        STSL sec. 4; ``A^+ y`` = ``operator.backproject(y)``)."""
        if self.init == "noise":
            return noise
        y = problem.measurement.to(device=noise.device, dtype=noise.dtype)
        with torch.no_grad():
            z = problem.to_latent(problem.operator.backproject(y))
        if z.shape[1:] != noise.shape[1:] or z.shape[0] not in (1, noise.shape[0]):
            raise ValueError(
                f"the encoded measurement has shape {tuple(z.shape)}, the prior's samples {tuple(noise.shape)}"
            )
        return alpha * z + sigma * noise

    def sample(
        self,
        model_fn: ModelFn,
        problem: InverseProblem,
        noise: torch.Tensor,
        alphas,
        sigmas,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> PosteriorResult:  # pragma: no cover - interface
        raise NotImplementedError


def _noise_like(z: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise of ``z``'s shape, drawn in float32 from ``generator`` (a list: one generator per sample,
    so sample ``n`` of a batch gets the draws it gets alone, as in diffusers' ``randn_tensor``)."""
    return randn_tensor(z.shape, generator=generator, device=z.device, dtype=torch.float32).to(z.dtype)


@dataclass
class DPS(PosteriorMethod):
    """Diffusion posterior sampling (Chung et al. 2023, Alg. 1): ``z_{i+1} = DDIM(z_i) - zeta grad ||y - A D(z0_hat)||``
    (+ the gluing term when ``gluing > 0``). One denoiser evaluation with a backward pass per step."""

    name: ClassVar[str] = "dps"

    def sample(self, model_fn, problem, noise, alphas, sigmas, generator=None) -> PosteriorResult:
        grid = as_grid(alphas, sigmas)
        z = self.init_latent(problem, noise, grid.alphas[0], grid.sigmas[0]).detach()
        for i in range(grid.num_steps):
            a, s, a_n, s_n = grid.alphas[i], grid.sigmas[i], grid.alphas[i + 1], grid.sigmas[i + 1]
            with torch.enable_grad():
                zg = z.detach().requires_grad_(True)
                z0, eps = model_fn(zg, i)
                loss = first_order_loss(problem, z0, self.gluing, self.loss)
                (grad,) = torch.autograd.grad(loss, zg)
            with torch.no_grad():
                xi = _noise_like(z, generator) if self.ddim_eta > 0 and s_n > 0 else None
                z = ddim_update(z0.detach(), eps.detach(), a, s, a_n, s_n, self.ddim_eta, xi)
                z = z - self.step_scale(a) * grad
        return PosteriorResult(z.detach(), grid.num_steps, grid.num_steps)


@dataclass
class PSLD(DPS):
    """PSLD (Rout et al. 2023): DPS on a latent prior with the gluing term on (``gluing`` = gamma, default 0.1)."""

    name: ClassVar[str] = "psld"
    gluing: float = 0.1


