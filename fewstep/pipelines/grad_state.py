"""Gradient bookkeeping for the samplers that differentiate through a model (posterior sampling, DPS): they need
autograd on (so not ``torch.inference_mode``) and no parameter gradients, without changing the caller's modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["frozen_parameters", "check_autograd_available"]


@contextmanager
def frozen_parameters(*modules: torch.nn.Module | None) -> Iterator[None]:
    """``requires_grad = False`` on every parameter of ``modules`` inside the block (gradients flow to the inputs
    only); each parameter's own flag is restored afterwards, also when the block raises."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def check_autograd_available(what: str) -> None:
    """``what`` differentiates through the model: refuse ``torch.inference_mode``, where autograd cannot run
    (``torch.no_grad`` is fine: the gradient steps enable grad locally)."""
    if torch.is_inference_mode_enabled():
        raise ValueError(f"{what} takes gradients through the model, which torch.inference_mode() disables; call it "
                         "outside inference mode (torch.no_grad() is fine)")
