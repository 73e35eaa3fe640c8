"""FlowChef on a class-conditional flow pipeline (``digits-flow``): tasks, per-task defaults, a DPS baseline.

``flowchef_sample`` runs the pipeline's UNet with a fewstep flow scheduler and a ``FlowChefHook``
(``solvers.flowchef``): per step one model evaluation, then ``M`` gradient steps of the task's cost on
``x0_hat = x - s v`` with ``v`` frozen, then the scheduler's step with the same ``v`` -- NFE equals the number of
steps. ``dps_sample`` is the DPS-style baseline (Chung et al. 2023, Alg. 1 transposed to rectified flow): the
gradient of ``||y - A(x0_hat(x))||`` is taken *through the model*, which costs a backward pass per step and
keeps the model's activations alive for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from .._checks import check_int, check_number
from ..guidance.operators import MeasurementOperator, make_operator
from ..guidance.posterior import InverseProblem, first_order_loss
from ..solvers.flowchef import (
    Cost,
    EditCost,
    FlowChefConfig,
    FlowChefHook,
    GaussianFill,
    classifier_cost,
    masked_guidance,
    measurement_cost,
)
from .grad_state import check_autograd_available, frozen_parameters
from .loop_checks import check_generators, raise_if_diverged

__all__ = ["TASKS", "INVERSE_TASKS", "DEFAULT_CONFIGS", "FlowChefTask", "make_task", "flowchef_sample",
           "flowchef_edit",
           "dps_sample", "DPS_STEP", "TaskResult", "run_task", "degraded_view", "EDIT_TASK", "central_mask",
           "run_edit", "inpainting_fill"]

INVERSE_TASKS = ("inpaint", "sr", "deblur")
TASKS = INVERSE_TASKS + ("classifier",)
#: masked editing (``flowchef_edit``): a task of its own, since it needs a source image, a mask and two labels
EDIT_TASK = "edit"

#: defaults per task for digits-flow at 20-30 steps (costs are per-image sums; tuned by scripts/bench_flowchef.py)
DEFAULT_CONFIGS: dict[str, FlowChefConfig] = {
    "inpaint": FlowChefConfig(step_size=0.5, inner_steps=1, optimizer="gd"),
    "sr": FlowChefConfig(step_size=0.5, inner_steps=2, optimizer="gd"),
    "deblur": FlowChefConfig(step_size=0.5, inner_steps=3, optimizer="gd"),
    "classifier": FlowChefConfig(step_size=0.05, inner_steps=2, optimizer="adam"),
    EDIT_TASK: FlowChefConfig(step_size=0.5, inner_steps=1, optimizer="gd"),  # keep-region cost: as inpainting
}
#: DPS step size zeta per task (the gradient is that of ||y - A x0_hat||, per image)
DPS_STEP = {"inpaint": 1.0, "sr": 2.0, "deblur": 1.0}


@dataclass
class FlowChefTask:
    """A cost on ``x0_hat`` plus what produced it: the operator and measurement (inverse problems) or labels."""

    name: str
    cost: Cost
    operator: MeasurementOperator | None = None
    measurement: torch.Tensor | None = None
    labels: torch.Tensor | None = None


def make_task(
    task: str,
    images: torch.Tensor | None = None,
    labels: Sequence[int] | torch.Tensor | None = None,
    classifier: torch.nn.Module | None = None,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    size: int = 16,
    scale: float = 1.0,
    measurement: torch.Tensor | None = None,
) -> FlowChefTask:
    """Build a task: ``inpaint``/``sr``/``deblur`` measure ``images`` (NCHW in [-1, 1]) with the task's default
    operator (``guidance.operators.make_operator``), or take a given ``measurement`` ``y`` of ``size x size``
    images instead; ``classifier`` needs ``labels`` and a ``classifier`` (default: the shipped
    ``digits-classifier``)."""
    if task not in TASKS:
        raise ValueError(f"unknown FlowChef task {task!r}; available: {', '.join(TASKS)}")
    if task == "classifier":
        if labels is None:
            raise ValueError("the classifier task needs `labels` (the requested classes)")
        target = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if classifier is None:
            from .defaults import load_default

            classifier = load_default("digits-classifier")
        n_cls = int(getattr(getattr(classifier, "config", None), "num_classes", 10))
        if target.numel() == 0 or target.min() < 0 or target.max() >= n_cls:
            raise ValueError(f"`labels` must be class ids in 0..{n_cls - 1}, got {target.tolist()}")
        # the caller's parameter flags are left alone: the steering differentiates with respect to x0_hat only
        return FlowChefTask(task, classifier_cost(classifier, target, scale), labels=target)
    if measurement is not None:
        if images is not None:
            raise ValueError("pass `images` to measure or a `measurement`, not both")
        operator = make_operator(task, size=size, noise_std=noise_std)
        y = measurement.to(torch.float32)
        operator.check_measurement(y, (y.shape[0], y.shape[1], size, size))
        return FlowChefTask(task, measurement_cost(operator, y, scale), operator, y)
    if images is None:
        raise ValueError(f"task {task!r} needs `images` to measure (NCHW in [-1, 1]) or a `measurement`")
    operator = make_operator(task, size=images.shape[-1], noise_std=noise_std)
    y = operator.measure(images, generator)
    return FlowChefTask(task, measurement_cost(operator, y, scale), operator, y)


def inpainting_fill(operator: MeasurementOperator, images: torch.Tensor | None = None, ridge: float = 0.02,
                    scale: float = 0.7) -> GaussianFill:
    """A :class:`~fewstep.solvers.flowchef.GaussianFill` for an inpainting ``operator`` (one mask for the whole
    batch) with the pixel covariance of ``images`` (NCHW in the model range; default: the training digits at the
    mask's size, the data ``digits-flow`` was trained on). ``ridge``/``scale``: tuned on held-out digits 200-231
    (box inpainting, 8-14 NFE)."""
    from ..guidance.operators import Inpainting

    if not isinstance(operator, Inpainting):
        raise ValueError(f"`operator` must be an inpainting operator (a mask), got {type(operator).__name__}")
    mask = operator.mask
    if mask.shape[0] != 1:
        raise ValueError(f"the fill needs one mask for the whole batch, got a mask of shape {tuple(mask.shape)}")
    if images is None:
        from ..datasets import load_digits_images

        images = load_digits_images(mask.shape[-1], "train")[0]
    if images.dim() != 4 or images.shape[-2:] != mask.shape[-2:] or mask.shape[1] not in (1, images.shape[1]):
        raise ValueError(f"`images` of shape {tuple(images.shape)} do not fit the mask {tuple(mask.shape)}")
    flat = images.reshape(images.shape[0], -1).double()
    if flat.shape[0] < 2:
        raise ValueError("`images` must hold at least 2 images to estimate a covariance")
    observed = mask[0].expand(images.shape[1:])
    return GaussianFill(torch.cov(flat.T), observed, ridge=ridge, scale=scale)


def _check_flow_scheduler(pipe) -> None:
    from ..samplers.base import FewstepScheduler
    from ..samplers.flow_euler import FewstepFlowChefScheduler

    sched = pipe.scheduler
    if isinstance(sched, FewstepFlowChefScheduler):
        raise ValueError(
            "the `flowchef` scheduler steers by itself (scheduler.set_cost + the pipeline's own loop); here, where "
            "the task and config are given, use a plain flow scheduler such as flow-euler"
        )
    if not isinstance(sched, FewstepScheduler):
        raise ValueError(
            f"FlowChef needs a fewstep scheduler (it runs as an engine hook), got {type(sched).__name__}; "
            "swap one in with fewstep.pipelines.swap.swap_sampler(pipe, 'flow-euler')"
        )
    if not sched.is_flow:
        raise ValueError(
            f"FlowChef needs a rectified-flow model; {type(sched).__name__} here runs a VP/diffusion schedule "
            "(e.g. digits-eps): use digits-flow (or another flow-matching model)"
        )


def _prepare(pipe, num_images, class_labels, generator, latents):
    device = pipe._execution_device
    n_null = pipe.null_class
    if class_labels is None:
        check_int("num_images", num_images, 1, numpy_ok=False)
        labels = torch.full((num_images,), n_null, dtype=torch.long)
    else:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() > n_null:
            raise ValueError(f"`class_labels` must be class ids in 0..{n_null} ({n_null} = unconditional)")
    check_generators(generator, labels.numel())
    cfg = pipe.unet.config
    shape = (labels.numel(), cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=pipe.unet.dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
    return latents.to(device), labels.to(device)


def _task_batch(task: FlowChefTask) -> torch.Tensor | None:
    """What a task holds one of per image: its measurements, else its labels (``None``: neither)."""
    return task.measurement if task.measurement is not None else task.labels


def _check_task_batch(task: FlowChefTask, x: torch.Tensor, class_labels_given: bool = False) -> None:
    """One measurement (or label) per image, or one measurement for all: a task's cost compares each image with its
    own, and a single image against several measurements would silently be steered towards their mean."""
    held = _task_batch(task)
    shared = task.measurement is not None and held.shape[0] == 1
    if held is not None and held.shape[0] != x.shape[0] and not shared:
        what = "measurements" if task.measurement is not None else "labels"
        if class_labels_given:  # the batch is one image per class label; num_images is not used then
            raise ValueError(
                f"`class_labels` holds {x.shape[0]} labels (one image each; `num_images` is not used when "
                f"`class_labels` is given), but the {task.name!r} task holds {held.shape[0]} {what}: pass "
                f"{held.shape[0]} class_labels (one per {what[:-1]}), or class_labels=None"
            )
        raise ValueError(
            f"`num_images` (or the latents' batch) is {x.shape[0]}, but the {task.name!r} task holds {held.shape[0]} "
            f"{what}: pass num_images={held.shape[0]} (one image per {what[:-1]})"
        )
    if task.operator is not None and task.measurement is not None:
        task.operator.check_measurement(task.measurement, x.shape)


@torch.no_grad()
def flowchef_sample(
    pipe,
    cost: Cost | FlowChefTask | None,
    num_images: int | None = None,
    class_labels: Sequence[int] | torch.Tensor | None = None,
    num_inference_steps: int = 20,
    config: FlowChefConfig | None = None,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    propagate: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample ``pipe`` (a ``ClassConditionalPipeline`` of a flow model with a fewstep flow scheduler) steered by
    ``cost``; returns NCHW images in the model range [-1, 1]. ``class_labels`` default to the null class
    (unconditional); ``guidance_scale != 1`` adds classifier-free guidance towards ``class_labels``.
    ``cost=None`` samples unsteered (the same loop, for comparisons). ``propagate``: the hook's map of each
    move (``FlowChefHook``), e.g. ``inpainting_fill(task.operator)``. ``num_images`` defaults to the number of
    measurements (or labels) a ``FlowChefTask`` holds and must be given otherwise; with ``class_labels`` the batch
    is one image per label and ``num_images`` is not used."""
    _check_flow_scheduler(pipe)
    task = cost if isinstance(cost, FlowChefTask) else None
    if task is not None:
        cost = task.cost
    check_int("num_inference_steps", num_inference_steps, 1, numpy_ok=False)
    if num_images is None and class_labels is None:
        held = None if task is None else _task_batch(task)
        if held is None:
            raise ValueError("`num_images` must be an integer >= 1, got None: pass num_images=N (or class_labels, one "
                             "image per label; a FlowChefTask with measurements or labels sets the count itself)")
        num_images = int(held.shape[0])
    x, labels = _prepare(pipe, num_images, class_labels, generator, latents)
    if task is not None:
        _check_task_batch(task, x, class_labels is not None)
    sched = pipe.scheduler
    sched.set_timesteps(num_inference_steps, device=x.device)
    if cost is not None:
        hook = FlowChefHook(cost, config, propagate)
        grid = sched.plan.grid
        hook.check_plan(grid.alphas, grid.sigmas, sched.plan.num_steps)  # fail before any model call
        sched.add_step_hook(hook)
    guided = guidance_scale != 1.0
    model_labels = torch.cat([labels, torch.full_like(labels, pipe.null_class)]) if guided else labels
    for t in sched.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        out = pipe.unet(model_in, t.reshape(1).expand(model_in.shape[0]), class_labels=model_labels).sample
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        x = sched.step(out, t, x).prev_sample
    return x


def dps_sample(
    pipe,
    operator: MeasurementOperator,
    measurement: torch.Tensor,
    num_images: int | None = None,
    num_inference_steps: int = 20,
    step_size: float = 1.0,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPS-style baseline on a flow model: ``x' = Euler(x, v) - zeta * grad_x ||y - A(x - s v_theta(x))||``, the
    gradient through the model (unconditional, null class). Returns NCHW images in [-1, 1]."""
    check_autograd_available("dps_sample")
    _check_flow_scheduler(pipe)
    if not step_size >= 0:
        raise ValueError(f"`step_size` (zeta) must be >= 0, got {step_size!r}")
    n = num_images if num_images is not None else measurement.shape[0]
    x, labels = _prepare(pipe, n, None, generator, latents)
    operator.check_measurement(measurement, x.shape)
    problem = InverseProblem(operator, measurement)  # the loss DPS/PSLD/STSL use on VP models (guidance.posterior)
    sched = pipe.scheduler
    sched.set_timesteps(num_inference_steps, device=x.device)
    sigmas = sched.plan.grid.sigmas
    alphas = sched.plan.grid.alphas
    with frozen_parameters(pipe.unet):  # gradients to the sample only; the caller's flags come back after
        for i, t in enumerate(sched.timesteps):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                v = pipe.unet(x, t.reshape(1).expand(x.shape[0]), class_labels=labels).sample
                x0_hat = (x - float(sigmas[i]) * v) / float(alphas[i] + sigmas[i])
                (grad,) = torch.autograd.grad(first_order_loss(problem, x0_hat), x)
            with torch.no_grad():
                x = sched.step(v.detach(), t, x.detach()).prev_sample - step_size * grad
    return x.detach()


@torch.no_grad()
def flowchef_edit(
    pipe,
    source: torch.Tensor,
    source_labels: Sequence[int] | torch.Tensor,
    target_labels: Sequence[int] | torch.Tensor,
    mask: torch.Tensor,
    num_inference_steps: int = 20,
    config: FlowChefConfig | None = None,
    guidance_scale: float = 2.0,
    source_steps: int = 0,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inversion-free masked editing with FlowChef (sec. 4.3): sample from noise towards ``target_labels`` while
    the :class:`~fewstep.solvers.flowchef.EditCost` keeps ``x0_hat`` on the ``source`` images (everywhere for the
    first ``source_steps`` steps -- the Flux recipe uses a third of the run; on 16x16 digits, whose class is
    settled early, any such step locks the edit region to the source, hence the default 0 -- then outside ``mask``),
    with the guidance
    ``v_tgt + mask * w * (v_tgt - v_src)`` acting only inside ``mask`` (1 = edit). ``source``: NCHW in [-1, 1].
    Two model evaluations per step (target and source condition in one batch)."""
    _check_flow_scheduler(pipe)
    src_l = torch.as_tensor(source_labels, dtype=torch.long).reshape(-1)
    tgt_l = torch.as_tensor(target_labels, dtype=torch.long).reshape(-1)
    if not (src_l.numel() == tgt_l.numel() == source.shape[0]):
        raise ValueError(f"need one source and one target label per source image ({source.shape[0]}), got "
                         f"{src_l.numel()} and {tgt_l.numel()}")
    steps = num_inference_steps
    check_int("num_inference_steps", steps, 1, numpy_ok=False)
    w = guidance_scale
    check_number("guidance_scale", w, 0, what="w")
    x, labels = _prepare(pipe, None, tgt_l, generator, latents)
    cost = EditCost(source.to(x), mask.to(x), source_steps)
    sched = pipe.scheduler
    sched.set_timesteps(steps, device=x.device)
    hook = FlowChefHook(cost, config if config is not None else DEFAULT_CONFIGS[EDIT_TASK])
    grid = sched.plan.grid
    hook.check_plan(grid.alphas, grid.sigmas, sched.plan.num_steps)
    sched.add_step_hook(hook)
    model_labels = torch.cat([labels, src_l.to(labels.device)])
    m = mask.to(x)
    for t in sched.timesteps:
        out = pipe.unet(torch.cat([x, x]), t.reshape(1).expand(2 * x.shape[0]), class_labels=model_labels).sample
        v_tgt, v_src = out.chunk(2)
        x = sched.step(masked_guidance(v_tgt, v_src, m, guidance_scale), t, x).prev_sample
    return x


def timed(fn, *args, **kwargs) -> tuple[torch.Tensor, float]:
    """``(fn(*args, **kwargs), seconds)``."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def degraded_view(task: FlowChefTask) -> torch.Tensor:
    """The measurement as a picture of the image's size (SR: nearest upsampling; inpainting: missing pixels at 0)."""
    y = task.measurement
    op = task.operator
    if y is None or op is None:
        raise ValueError(f"task {task.name!r} has no measurement to show")
    from .posterior import degraded_view as view

    return view(op, y)


@dataclass
class TaskResult:
    """Images NCHW in [-1, 1]; for inverse problems the degraded views and ground truth; metrics by name."""

    images: torch.Tensor
    nfe: int
    seconds: float
    config: FlowChefConfig
    degraded: torch.Tensor | None = None
    truth: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def run_task(
    pipe,
    task: str,
    num_images: int = 10,
    steps: int = 20,
    seed: int = 0,
    classes: Sequence[int] | None = None,
    config: FlowChefConfig | None = None,
    noise_std: float = 0.0,
    measurement: torch.Tensor | None = None,
    gaussian_fill: bool = False,
) -> TaskResult:
    """One FlowChef run of ``task`` on ``pipe`` (digits-flow): inverse problems restore held-out test digits
    (seeded measurement) or a given ``measurement`` (one image per measured tile; ``num_images`` is then its
    batch size), ``classifier`` steers an unconditional (null-class) run towards ``classes`` (default: cycle
    0-9). Reports PSNR/SSIM against the ground truth, the RMSE of ``A(x) - y`` for a given measurement, or the
    shipped classifier's accuracy. ``gaussian_fill`` (``inpaint`` only): FlowChef + the Gaussian-prior fill of the
    hole (``inpainting_fill``)."""
    from ..bench.image_metrics import psnr, ssim
    from ..datasets import held_out_digits, to_unit_range

    if task not in TASKS:
        raise ValueError(f"unknown FlowChef task {task!r}; available: {', '.join(TASKS)}")
    check_int("num_images", num_images, 1, numpy_ok=False)
    if not isinstance(gaussian_fill, bool) or (gaussian_fill and task != "inpaint"):
        raise ValueError(f"`gaussian_fill` (a bool) applies to task 'inpaint' only, got {gaussian_fill!r} for "
                         f"task {task!r}")
    _check_flow_scheduler(pipe)
    config = config if config is not None else DEFAULT_CONFIGS[task]
    generator = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    truth = degraded = None
    if task == "classifier":
        pool = list(classes) if classes else list(range(pipe.num_classes))
        labels = [pool[i % len(pool)] for i in range(num_images)]
        spec = make_task(task, labels=labels)
    elif measurement is not None:
        if classes:
            raise ValueError(f"task {task!r} restores the measurement; it takes no classes")
        spec = make_task(task, noise_std=noise_std, size=size, measurement=measurement)
        num_images = int(spec.measurement.shape[0])
        degraded = degraded_view(spec)
    else:
        if classes:
            raise ValueError(f"task {task!r} restores held-out digits; it takes no classes")
        truth, _ = held_out_digits(num_images, size)
        spec = make_task(task, truth, noise_std=noise_std, generator=torch.Generator().manual_seed(seed + 1))
        degraded = degraded_view(spec)
    start = time.perf_counter()
    propagate = inpainting_fill(spec.operator) if gaussian_fill else None
    x = flowchef_sample(pipe, spec, num_images=num_images, num_inference_steps=steps, config=config,
                        generator=generator, propagate=propagate)
    seconds = time.perf_counter() - start
    raise_if_diverged(x)
    metrics: dict[str, float] = {}
    if truth is not None:
        a, b = to_unit_range(x.float().cpu()), to_unit_range(truth)
        metrics = {"psnr": float(psnr(a, b).mean()), "ssim": float(ssim(a, b).mean())}
    elif spec.operator is not None:
        residual = spec.operator(x.float().cpu()) - spec.measurement
        metrics = {"measurement_rmse": float(residual.pow(2).mean().sqrt())}
    else:
        from .defaults import load_default

        classifier = load_default("digits-classifier")
        with torch.no_grad():
            pred = classifier(x.float().cpu().clamp(-1, 1)).argmax(1)
        metrics = {"accuracy": float((pred == spec.labels).float().mean())}
    return TaskResult(x, len(pipe.scheduler.timesteps), seconds, config, degraded, truth, metrics)


def central_mask(size: int, edit_size: int) -> torch.Tensor:
    """A ``1 x 1 x size x size`` edit mask: 1 on the centred ``edit_size x edit_size`` square (the region that may
    change), 0 on the border that must keep the source."""
    for name, v in (("size", size), ("edit_size", edit_size)):
        check_int(name, v, 1, numpy_ok=False)
    if edit_size > size:
        raise ValueError(f"`edit_size` must be <= the image size {size}, got {edit_size}")
    mask = torch.zeros(1, 1, size, size)
    lo = (size - edit_size) // 2
    mask[..., lo:lo + edit_size, lo:lo + edit_size] = 1
    return mask


def run_edit(
    pipe,
    num_images: int = 10,
    steps: int = 20,
    seed: int = 0,
    target_classes: Sequence[int] | None = None,
    config: FlowChefConfig | None = None,
    guidance_scale: float = 4.0,
    edit_size: int = 12,
    source: torch.Tensor | None = None,
    source_classes: Sequence[int] | None = None,
) -> TaskResult:
    """FlowChef masked editing (:func:`flowchef_edit`) of ``num_images`` held-out test digits, or of given ``source``
    images (NCHW in [-1, 1]; then ``source_classes`` are required and ``num_images`` is their count), towards
    ``target_classes`` (cycled; default: each source's class + 1) inside a centred ``edit_size`` square.

    ``TaskResult.degraded`` holds the sources; metrics: the shipped classifier's target-class accuracy
    (``target_accuracy``) and the mean squared change outside the mask (``keep_mse``, images in [-1, 1])."""
    from ..datasets import held_out_digits
    from .defaults import load_default

    _check_flow_scheduler(pipe)
    size = pipe.unet.config.sample_size
    mask = central_mask(size, edit_size)
    if source is None:
        if source_classes is not None:
            raise ValueError("`source_classes` label given `source` images; held-out digits carry their own")
        source, src_l = held_out_digits(num_images, size)
    else:
        expected = (pipe.unet.config.in_channels, size, size)
        if source.ndim != 4 or tuple(source.shape[1:]) != expected:
            raise ValueError(f"`source` must be N x {' x '.join(map(str, expected))} images, got {tuple(source.shape)}")
        if not source_classes:
            raise ValueError("editing given `source` images needs `source_classes` (what each image shows)")
        src_l = torch.as_tensor([source_classes[i % len(source_classes)] for i in range(source.shape[0])])
    n = source.shape[0]
    n_cls = pipe.num_classes
    for name, classes in (("source_classes", src_l.tolist()), ("target_classes", target_classes or [])):
        bad = [c for c in classes if not 0 <= int(c) < n_cls]
        if bad:
            raise ValueError(f"`{name}` must be class ids in 0..{n_cls - 1}, got {bad}")
    if target_classes:
        tgt_l = torch.as_tensor([target_classes[i % len(target_classes)] for i in range(n)])
    else:
        tgt_l = (src_l + 1) % n_cls
    start = time.perf_counter()
    x = flowchef_edit(pipe, source, src_l, tgt_l, mask, num_inference_steps=steps, config=config,
                      guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    x = x.float().cpu()
    raise_if_diverged(x)
    classifier = load_default("digits-classifier")
    with torch.no_grad():
        pred = classifier(x.clamp(-1, 1)).argmax(1)
    keep = 1 - mask
    metrics = {"target_accuracy": float((pred == tgt_l).float().mean())}
    if keep.sum() > 0:  # an edit_size of the whole image keeps nothing: no keep_mse
        metrics["keep_mse"] = float(((x - source) * keep).pow(2).sum() / (keep.sum() * n * x.shape[1]))
    used = config if config is not None else DEFAULT_CONFIGS[EDIT_TASK]
    return TaskResult(x, 2 * len(pipe.scheduler.timesteps), seconds, used, source, None, metrics)


def as_numpy_images(x: torch.Tensor) -> np.ndarray:
    """NCHW in [-1, 1] -> NHWC float32 in [0, 1]."""
    return ((x.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def decoded_cost(fp: Any, pixel_cost: Callable[[torch.Tensor], torch.Tensor], height: int, width: int) -> Callable:
    """A FlowChef cost on SD3/Flux latents from a cost on decoded pixels (``[-1, 1]``, NCHW).

    FlowChef's recipe for latent models with pixel-space measurements (super-resolution, deblurring):
    ``x0_hat`` is decoded by the VAE and the measurement loss is taken on the image; the gradient flows
    through the decoder only, never through the transformer. ``fp`` is a ``FewstepPipeline`` around an
    SD3 or Flux pipeline; use with ``fp.scheduler.set_cost(...)`` when the scheduler is ``flowchef``.
    """
    if not callable(pixel_cost):
        raise TypeError(f"`pixel_cost` must be callable (images -> per-image losses), got {type(pixel_cost).__name__}")
    if getattr(fp, "family", None) not in ("sd3", "flux"):
        raise ValueError(
            f"`decoded_cost` needs a FewstepPipeline around an SD3 or Flux pipeline, got family "
            f"{getattr(fp, 'family', type(fp).__name__)!r}"
        )

    def cost(x0_hat: torch.Tensor) -> torch.Tensor:
        return pixel_cost(fp.decode_flow_latents(x0_hat, height, width).float())

    return cost
