"""Module-state bookkeeping without changing the caller's modules: the samplers that differentiate through a model
(posterior sampling, DPS) need autograd on (so not ``torch.inference_mode``) and no parameter gradients; estimators
that run a model need it in eval mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["frozen_parameters", "eval_mode", "check_autograd_available"]


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


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` (and its submodules) in eval mode inside the block (dropout off, norms on running statistics);
    each submodule's own ``training`` flag is restored afterwards, also when the block raises."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def check_autograd_available(what: str) -> None:
    """``what`` differentiates through the model: refuse ``torch.inference_mode``, where autograd cannot run
    (``torch.no_grad`` is fine: the gradient steps enable grad locally)."""
    if torch.is_inference_mode_enabled():
        raise ValueError(f"{what} takes gradients through the model, which torch.inference_mode() disables; call it "
                         "outside inference mode (torch.no_grad() is fine)")
