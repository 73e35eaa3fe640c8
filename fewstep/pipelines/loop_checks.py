"""Checks shared by ``FewstepPipeline``'s loops: what a step-end callback may see, the NaN/Inf watch that names
the first bad step without a host sync inside the loop, the check that a finished run's images are finite, and
the shape of user latents."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "callback_tensors", "check_returned", "FiniteWatch", "raise_if_diverged", "check_generators", "check_latents",
]


def callback_tensors(x: torch.Tensor, conds: dict) -> dict:
    """What ``callback_on_step_end`` may ask for: the latents, and the prompt embeddings where there are some."""
    return {"latents": x, "prompt_embeds": conds["embeds"]} if "embeds" in conds else {"latents": x}


class FiniteWatch:
    """The first step whose latents hold a NaN/Inf, tracked on the device (no host sync inside the loop).

    Each step's latents are summed into a preallocated slot (one reduction, in float64: a sum of finite float32
    values cannot overflow there, and NaN/Inf propagate through it), and the sums are checked once after the loop;
    an elementwise ``isfinite`` watch cost ~10 kernels a step (found by a host-overhead audit)."""

    def __init__(self, device: torch.device, num_steps: int):
        dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64  # (mps has no float64)
        self.sums = torch.zeros(max(int(num_steps), 1), device=device, dtype=dtype)

    def update(self, x: torch.Tensor, i: int) -> None:
        torch.sum(x, dim=tuple(range(x.dim())), dtype=self.sums.dtype, out=self.sums[i])

    def raise_if_bad(self, num_steps: int, sampler: str) -> None:
        bad = torch.nonzero(~torch.isfinite(self.sums)).flatten().tolist()  # the one host sync, after the loop
        if bad:
            raise FloatingPointError(
                f"sampling produced NaN/Inf at step {bad[0]} of {num_steps} (sampler {sampler}); pass "
                "check_finite=False to return it anyway"
            )


def check_returned(name: str, value: Any, current: torch.Tensor, step: int) -> torch.Tensor:
    """A tensor a ``callback_on_step_end`` returned in place of ``current``: it must keep its shape, because the
    loop's guidance rule keeps both branches for the whole run (diffusers' CFG-cutoff callbacks shrink the batch to
    the conditional half; with fewstep, end guidance with a per-step scale sequence instead)."""
    if not isinstance(value, torch.Tensor) or value.shape != current.shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"callback_on_step_end returned `{name}` of shape {got} at step {step}; the loop needs shape "
            f"{tuple(current.shape)} (both guidance branches run for the whole call: to stop guiding after k steps "
            "use a per-step scale, e.g. guidance.CFG([7.5] * k + [1.0] * (n - k)))"
        )
    return value


def raise_if_diverged(images: Any) -> None:
    """``FloatingPointError`` naming how many of the ``images`` (numpy or torch, batch first) hold NaN/Inf: a run
    that diverged writes no file and reports no metric."""
    flat = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    bad = int((~torch.isfinite(flat.reshape(flat.shape[0], -1))).any(dim=1).sum()) if flat.numel() else 0
    if bad:
        raise FloatingPointError(f"{bad} of {flat.shape[0]} images hold NaN/Inf (the sampling diverged: lower the "
                                 "step size, guidance or noise settings); nothing was written")  # fmt: skip


def check_generators(generator: Any, batch: int | None = None) -> None:
    """``generator`` is ``None``, a ``torch.Generator`` or a list of them; a list must hold one per image (``batch``,
    when given), as diffusers requires (a shorter list failed with an IndexError, a longer one was silently
    truncated); a single generator serves the whole batch."""
    items = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in items):
        bad = next(g for g in items if not isinstance(g, torch.Generator))
        raise ValueError(f"`generator` must be a torch.Generator or a list of them (one per image), got "
                         f"{type(bad).__name__} {bad!r}")  # fmt: skip
    if batch is not None and isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"`generator` is a list of {len(generator)} generators, but the batch has {batch} images; "
                         "pass one generator per image (or a single generator)")


def check_latents(latents: Any, shape: tuple[int, ...], layout: str) -> None:
    """User ``latents`` must be a floating tensor of ``shape`` (``layout`` names its axes), checked before the base
    pipeline's ``prepare_latents`` (which takes any tensor and fails, if at all, deep inside the model)."""
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or tuple(latents.shape) != shape:
        got = (f"a {latents.dtype} tensor of shape {tuple(latents.shape)}" if isinstance(latents, torch.Tensor)
               else type(latents).__name__)
        raise ValueError(f"`latents` must be a floating tensor of shape {shape} ({layout}), got {got}")
