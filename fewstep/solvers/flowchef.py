"""FlowChef: steering a rectified-flow sampler in the vector field, without backpropagating through the model.

Patel, Wen, Metaxas & Yang, "Steering Rectified Flow Models in the Vector Field for Controlled Image
Generation" (arXiv 2412.00100, sec. 3-4; ICCV 2025 as "FlowChef"). For ``x_s = (1 - s) x0 + s eps`` and a
velocity model ``v = eps - x0``, one denoising step ``s -> s'`` with a cost ``C`` on the clean image is::

    v = v_theta(x, s)                                  (one model evaluation, no autograd)
    repeat M times (v held FIXED):  x0_hat = x - s v;  x <- x - eta * grad_x C(x0_hat)
    x' = x + (s' - s) v                                (the same v: NFE does not grow)

With ``v`` frozen, ``d x0_hat / d x = I``, so ``grad_x C(x0_hat) = grad_{x0_hat} C`` ("gradient skipping": the
paper's claim is that for nearly straight trajectories ``I - s dv/dx`` is well approximated by ``I`` up to the
step size). Only the cost (a measurement operator, a classifier, a VAE decoder) is differentiated.

**In the engine's pair form** (``solvers.engine``) the buffered evaluation ``(x_eval, x0, eps)`` has
``v = eps - x0`` and, for a consistent pair, ``x0 = x_eval - s v``; so ``x0_hat(x) = x0 + (x - x_eval)``, which
also covers an inconsistent (CFG++) pair. After the inner loop moves the sample by ``delta``, the hook shifts
the buffered evaluation by the same ``delta`` (``x_eval + delta``, ``x0 + delta``, ``eps + delta``): the velocity is
unchanged and the buffer holds the frozen-``v`` estimate of the model at the moved point. A first-order step
(DDIM on a flow grid = flow-matching Euler) then gives ``alpha' (x0 + delta) + sigma' (eps + delta) = x + (s' - s) v``
with ``x`` the moved sample; a corrector's move (``x - x_eval`` times ``L``) is kept as it was, so a zero cost
(or ``eta = 0``) reproduces the unsteered sampler exactly. Multistep solvers see the frozen-``v`` estimate.

Optimizers (sec. 3.3 of our research notes): plain gradient descent (the Flux / RF++ code) or Adam with fresh
moments every denoising step (the InstaFlow code; then ``eta`` is roughly a per-element step). The inner loop
uses autograd on the cost only, and no host synchronisation.

Nothing here imports diffusers; costs are plain callables ``cost(x0_hat) -> [N]`` (per-image losses) or a scalar.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .._checks import check_int, check_number
from .engine import EngineState, Evaluation

__all__ = [
    "OPTIMIZERS",
    "FlowChefConfig",
    "Cost",
    "flowchef_update",
    "FlowChefHook",
    "GaussianFill",
    "measurement_cost",
    "classifier_cost",
    "EditCost",
    "masked_guidance",
    "is_flow_grid",
]

OPTIMIZERS = ("gd", "adam")

#: a cost on the clean-image estimate: per-image losses ``[N]`` (summed) or a scalar
Cost = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlowChefConfig:
    """FlowChef's knobs.

    Attributes:
        step_size: ``eta >= 0``, the gradient step on ``x`` (GD) or Adam's learning rate. Not transferable between
            costs: it multiplies the cost's own scale (ours are sums of squared errors per image, so ``eta = 0.5``
            with GD on a mask cost replaces the observed pixels of ``x0_hat`` by the measurement).
        inner_steps: ``M >= 1`` gradient steps per steered denoising step.
        steered_steps: ``K``: steer the first ``K`` steps; ``None`` = all but the last (the RF++ recipe).
        optimizer: ``"gd"`` or ``"adam"`` (moments re-created every denoising step).
        betas, adam_eps: Adam's constants.
    """

    step_size: float = 0.5
    inner_steps: int = 1
    steered_steps: int | None = None
    optimizer: str = "gd"
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        eta = self.step_size
        check_number("step_size", eta, 0, what="eta")
        m = self.inner_steps
        check_int("inner_steps", m, 1, what="M")
        k = self.steered_steps
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0):
            raise ValueError(f"`steered_steps` (K) must be an integer >= 0 or None (all but the last), got {k!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        betas = self.betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
            not isinstance(b, (bool, np.bool_)) and isinstance(b, (int, float, np.integer, np.floating)) and 0 <= b < 1
            for b in betas
        )):
            raise ValueError(f"`betas` must be two numbers (beta1, beta2) in [0, 1), got {betas!r}")
        check_number("adam_eps", self.adam_eps, 0, low_open=True)

    def num_steered(self, num_steps: int) -> int:
        """``K`` resolved against a run of ``num_steps`` steps; ``K > num_steps`` is an error."""
        if self.steered_steps is None:
            return max(num_steps - 1, 0)
        if self.steered_steps > num_steps:
            raise ValueError(
                f"`steered_steps` (K) = {self.steered_steps} exceeds the number of sampling steps {num_steps}; "
                f"allowed: 0..{num_steps} (or None for all but the last)"
            )
        return int(self.steered_steps)


def flowchef_update(x: torch.Tensor, offset: torch.Tensor, cost: Cost, config: FlowChefConfig) -> torch.Tensor:
    """The inner loop: ``M`` descent steps on ``x`` of ``cost(x + offset)`` where ``x + offset = x0_hat(x)``.

    ``offset = x0 - x_eval`` is ``-s v`` for a consistent flow pair, held fixed (no gradient flows into the model).
    Returns the moved sample (detached). Runs under ``torch.enable_grad`` so it works inside ``no_grad`` pipelines.
    """
    eta = float(config.step_size)
    offset = offset.detach()
    y = x.detach()
    if eta == 0.0:
        return y
    if torch.is_inference_mode_enabled():  # enable_grad does not lift it: the cost would silently not steer
        raise ValueError("FlowChef steering takes gradients of the cost, which torch.inference_mode() disables; "
                         "sample outside inference mode (torch.no_grad() is fine)")
    b1, b2 = config.betas
    m = v = None
    with torch.enable_grad():
        for k in range(1, config.inner_steps + 1):
            y = y.detach().requires_grad_(True)
            loss = cost(y + offset)
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"the FlowChef cost must return a tensor (per-image losses or a scalar), got "
                                f"{type(loss).__name__}")  # fmt: skip
            if not loss.requires_grad:  # a cost that does not depend on x0_hat (or detaches it): no steering
                return y.detach()
            (grad,) = torch.autograd.grad(loss.sum(), y, allow_unused=True)
            if grad is None:
                return y.detach()
            if config.optimizer == "gd":
                step = eta * grad
            else:
                m = (1 - b1) * grad if m is None else b1 * m + (1 - b1) * grad
                v = (1 - b2) * grad * grad if v is None else b2 * v + (1 - b2) * grad * grad
                m_hat = m / (1 - b1**k)
                v_hat = v / (1 - b2**k)
                step = eta * m_hat / (v_hat.sqrt() + config.adam_eps)
            y = y.detach() - step
    return y.detach()


def is_flow_grid(alphas: np.ndarray, sigmas: np.ndarray) -> bool:
    """A grid of the rectified-flow schedule has ``alpha + sigma = 1`` at every point."""
    return bool(np.allclose(np.asarray(alphas) + np.asarray(sigmas), 1.0, rtol=0, atol=1e-9))


class FlowChefHook:
    """The engine hook (``hook(state, i)``, run after the corrector and before the predictor) applying FlowChef.

    Steers steps ``i < K``. A plan whose grid is not a rectified-flow grid (a VP model) is refused: FlowChef's
    ``x0_hat = x - s v`` with a frozen velocity only holds for ``x_s = (1 - s) x0 + s eps``.

    ``propagate`` (optional, an extension beyond the paper): a map applied to the inner loop's move ``delta`` of
    the sample before it is committed, e.g. :class:`GaussianFill`, which spreads a move confined to observed
    pixels into the unobserved ones.
    """

    def __init__(self, cost: Cost, config: FlowChefConfig | None = None,
                 propagate: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if not callable(cost):
            raise TypeError(f"`cost` must be callable (x0_hat -> per-image losses), got {type(cost).__name__}")
        if propagate is not None and not callable(propagate):
            raise TypeError(f"`propagate` must be callable (delta -> delta) or None, got {type(propagate).__name__}")
        self.cost = cost
        self.config = config if config is not None else FlowChefConfig()
        self.propagate = propagate
        self._checked: tuple[int, int] | None = None  # (id(plan), K)

    def check_plan(self, alphas: np.ndarray, sigmas: np.ndarray, num_steps: int) -> int:
        """Validate a run (flow grid, ``K <= steps``) on the host; returns ``K``."""
        if not is_flow_grid(alphas, sigmas):
            raise ValueError(
                "FlowChef needs a rectified-flow (flow-matching) model: this sampler runs a VP/diffusion schedule "
                "(alpha + sigma != 1); use a flow model such as digits-flow with a flow scheduler (e.g. flow-euler)"
            )
        return self.config.num_steered(num_steps)

    def __call__(self, state: EngineState, i: int) -> None:
        plan = state.plan
        if self._checked is None or self._checked[0] != id(plan):
            k = self.check_plan(plan.grid.alphas, plan.grid.sigmas, plan.num_steps)
            self._checked = (id(plan), k)
        if i >= self._checked[1]:
            return
        set_step = getattr(self.cost, "set_step", None)
        if set_step is not None:  # step-dependent costs (editing)
            set_step(i)
        ev = state.buffer[-1]
        x = state.sample
        moved = flowchef_update(x, ev.x0 - ev.x_eval, self.cost, self.config)
        delta = moved - x
        if self.propagate is not None:
            delta = self.propagate(delta)
            moved = x + delta
        state.sample = moved
        state.buffer[-1] = Evaluation(ev.x_eval + delta, ev.x0 + delta, ev.eps + delta)


class GaussianFill:
    """Spread a move of the observed pixels into the unobserved ones by the regression under a Gaussian prior.

    FlowChef's gradient skipping takes ``d x0_hat / d x = I``, so a cost that reads only some pixels (inpainting)
    moves only those pixels of ``x``; the hole learns about the measurement only through the model's next
    velocity, one step late. If ``x0 ~ N(mu, Sigma)``, the posterior mean of the unobserved part ``h`` changes
    with the observed part ``o`` by the regression (simple kriging)::

        delta_h = scale * Sigma_ho (Sigma_oo + ridge I)^-1 delta_o

    which this map applies to a move ``delta`` (``[N, *image]``; its ``o`` part is kept, its ``h`` part replaced).
    ``ridge`` regularises ``Sigma_oo`` (a sample covariance is near-singular), ``scale`` damps the prior's
    guess (the model's own velocities refine the hole in later steps). ``covariance``: ``[D, D]`` over a
    flattened image (``D = C*H*W``, e.g. ``torch.cov`` of training images in the model's range; only practical
    for small pixel-space images); ``observed``: 1/True where the measurement sees a pixel, any shape with ``D``
    elements (one mask for the whole batch). An extension of ours, not in the FlowChef paper; measured in the
    README (box inpainting on ``digits-flow``).
    """

    def __init__(self, covariance: torch.Tensor, observed: torch.Tensor, ridge: float = 0.02, scale: float = 0.7):
        cov = torch.as_tensor(covariance)
        if cov.dim() != 2 or cov.shape[0] != cov.shape[1] or cov.shape[0] < 2:
            raise ValueError(f"`covariance` must be a square [D, D] matrix (D >= 2), got shape {tuple(cov.shape)}")
        d = cov.shape[0]
        obs = torch.as_tensor(observed)
        if obs.dtype != torch.bool and not bool(((obs == 0) | (obs == 1)).all()):
            raise ValueError("`observed` must be a 0/1 (or boolean) mask")
        if obs.numel() != d:
            raise ValueError(f"`observed` has {obs.numel()} elements but `covariance` is over D = {d} pixels")
        check_number("ridge", ridge, 0)
        check_number("scale", scale, 0)
        obs = obs.reshape(-1).bool()
        o, h = obs.nonzero().squeeze(1), (~obs).nonzero().squeeze(1)
        if o.numel() == 0 or h.numel() == 0:
            raise ValueError("`observed` must mark some pixels observed and some not (nothing to fill otherwise)")
        cov = cov.double()
        s_oo = cov[o][:, o] + ridge * torch.eye(o.numel(), dtype=torch.float64)
        # R = Sigma_ho Sigma_oo^-1, by a solve against the symmetric Sigma_oo (no explicit inverse)
        self.regression = torch.linalg.solve(s_oo, cov[o][:, h]).T.contiguous().float()
        self.observed_index, self.hidden_index = o, h
        self.num_pixels, self.scale = d, float(scale)
        self._on: dict = {}  # (device, dtype) -> (o, h, scale * R^T): copied once, not every step

    def _tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._on:
            self._on[key] = (self.observed_index.to(like.device), self.hidden_index.to(like.device),
                             (self.scale * self.regression.T).to(like))
        return self._on[key]

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        flat = delta.reshape(delta.shape[0], -1)
        if flat.shape[1] != self.num_pixels:
            raise ValueError(f"GaussianFill was built for images of {self.num_pixels} values, got a move of shape "
                             f"{tuple(delta.shape)}")
        o, h, weight = self._tensors(delta)
        out = flat.clone()
        out[:, h] = flat[:, o] @ weight
        return out.reshape(delta.shape)


def measurement_cost(operator: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, scale: float = 1.0) -> Cost:
    """``scale * ||A(x0_hat) - y||^2`` per image (a linear inverse problem; for inpainting ``A`` is the mask, so the
    loss is masked). ``operator`` is any callable ``A``; ``y`` has the shape of ``A(x0_hat)``."""
    if not callable(operator):
        raise TypeError(f"`operator` must be callable, got {type(operator).__name__}")
    scale = check_number("scale", scale, 0.0)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"`y` must be a tensor (the measurement), got {type(y).__name__}")
    target = y.detach()

    def cost(x0_hat: torch.Tensor) -> torch.Tensor:
        return scale * (operator(x0_hat) - target).pow(2).flatten(1).sum(1)

    return cost


def classifier_cost(classifier: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                    scale: float = 1.0) -> Cost:
    """``scale * CE(classifier(x0_hat), label)`` per image: classifier guidance on the clean estimate (FlowChef
    sec. 4). ``classifier`` maps images (the model's pixel range) to logits ``[N, classes]``. A classifier module
    with parameters gets ``x0_hat`` in its own dtype (half-precision runs hand costs a float32 ``x0_hat``, the
    solver's compute dtype); the cost comes back in float32."""
    if not callable(classifier):
        raise TypeError(f"`classifier` must be callable, got {type(classifier).__name__}")
    scale = check_number("scale", scale, 0.0)
    target = torch.as_tensor(labels).detach().long().reshape(-1)

    param = next(classifier.parameters(), None) if isinstance(classifier, torch.nn.Module) else None

    def cost(x0_hat: torch.Tensor) -> torch.Tensor:
        logits = classifier(x0_hat if param is None else x0_hat.to(param.dtype)).float()
        return scale * torch.nn.functional.cross_entropy(logits, target.to(logits.device), reduction="none")

    return cost


class EditCost:
    """FlowChef's editing cost (paper sec. 4.3; the Flux / InstaFlow edit recipes of the reference code): for the
    first ``source_steps`` steered steps ``x0_hat`` is pulled to the source image everywhere (the trajectory starts
    from noise, no inversion), afterwards only in the keep region ``1 - mask``, so the edit region is free to follow
    the (masked) guidance: ``scale * ||r_i * (x0_hat - source)||^2`` per image, ``r_i = 1`` or ``1 - mask``.

    ``mask``: 1 where the image may change (broadcast against the images). The hook calls ``set_step(i)``.
    """

    def __init__(self, source: torch.Tensor, mask: torch.Tensor, source_steps: int, scale: float = 1.0):
        check_int("source_steps", source_steps, 0, numpy_ok=False)
        scale = check_number("scale", scale, 0.0)
        mask = torch.as_tensor(mask, dtype=source.dtype)
        if not bool(((mask >= 0) & (mask <= 1)).all()):  # set-up code: reading the mask back is fine; NaN fails too
            raise ValueError("`mask` must lie in [0, 1] (1 = region to edit; no NaN)")
        try:
            torch.broadcast_shapes(mask.shape, source.shape)
        except RuntimeError:
            raise ValueError(f"`mask` of shape {tuple(mask.shape)} does not broadcast against the source images "
                             f"{tuple(source.shape)}") from None
        self.source, self.keep = source.detach(), (1 - mask).detach()
        self.source_steps, self.scale = source_steps, scale
        self.step = 0

    def set_step(self, i: int) -> None:
        self.step = i

    def __call__(self, x0_hat: torch.Tensor) -> torch.Tensor:
        diff = x0_hat - self.source.to(x0_hat)
        if self.step >= self.source_steps:
            diff = diff * self.keep.to(x0_hat)
        return self.scale * diff.pow(2).flatten(1).sum(1)


def masked_guidance(v_target: torch.Tensor, v_source: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Editing guidance restricted to the edit region: ``v = v_tgt + mask * w * (v_tgt - v_src)`` -- CFG with the
    source condition as the negative, only where ``mask = 1`` (FlowChef sec. 4.3). ``scale`` is a finite number
    (a Python number: called every step, it is checked without reading a tensor back)."""
    if not isinstance(scale, torch.Tensor):
        check_number("scale", scale)
    return v_target + mask.to(v_target) * scale * (v_target - v_source)
