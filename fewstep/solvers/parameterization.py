"""Model output <-> ``(x0, eps)`` pair, the one boundary every solver goes through (DESIGN contract 2).

With ``x_t = alpha x0 + sigma eps``:

* ``epsilon``: output ``eps``; ``x0 = (x_t - sigma eps) / alpha``
* ``sample``: output ``x0``; ``eps = (x_t - alpha x0) / sigma``
* ``v_prediction``: output ``v = alpha eps - sigma x0`` (Salimans & Ho 2022, for VP with
  ``alpha^2 + sigma^2 = 1``); ``x0 = alpha x_t - sigma v``, ``eps = sigma x_t + alpha v``. For a
  non-VP schedule the general inverse ``x0 = (alpha x_t - sigma v)/(alpha^2 + sigma^2)`` is used.
* ``flow``: rectified-flow velocity ``v = eps - x0`` (with ``alpha = 1 - s``, ``sigma = s``);
  ``x0 = x_t - sigma v``, ``eps = x_t + alpha v``.

Coefficients are Python floats, so the conversions add no host sync.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["PREDICTION_TYPES", "normalize_prediction_type", "to_pair", "from_pair", "compute_dtype"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")
_ALIASES = {"flow_prediction": "flow"}


def normalize_prediction_type(prediction_type: str) -> str:
    """Canonical name; accepts diffusers' ``flow_prediction`` for ``flow``."""
    name = _ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        raise ValueError(
            f"`prediction_type` must be one of {list(PREDICTION_TYPES)} (or 'flow_prediction'), got {prediction_type!r}"
        )
    return name


def to_pair(
    output: torch.Tensor,
    sample: torch.Tensor,
    alpha: float | torch.Tensor,
    sigma: float | torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a model output at ``x_t = sample`` to ``(x0, eps)``; needs ``alpha > 0`` and ``sigma > 0``.

    ``alpha``/``sigma`` given as Python numbers are checked (tensors are not: that would sync the device)."""
    kind = normalize_prediction_type(prediction_type)
    _check_coefficients(alpha, sigma, kind, "> 0", "convert")
    if kind == "epsilon":
        return (sample - sigma * output) / alpha, output
    if kind == "sample":
        return output, (sample - alpha * output) / sigma
    if kind == "v_prediction":
        norm = alpha * alpha + sigma * sigma
        x0 = (alpha * sample - sigma * output) / norm
        eps = (sigma * sample + alpha * output) / norm
        return x0, eps
    x0 = sample - sigma * output
    eps = sample + alpha * output
    return x0, eps


def from_pair(
    x0: torch.Tensor, eps: torch.Tensor, alpha: float, sigma: float, prediction_type: str
) -> torch.Tensor:
    """The model output of type ``prediction_type`` that corresponds to ``(x0, eps)``; ``alpha, sigma >= 0``."""
    kind = normalize_prediction_type(prediction_type)
    _check_coefficients(alpha, sigma, kind, ">= 0", "form")
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return alpha * eps - sigma * x0
    return eps - x0


def _check_coefficients(alpha: Any, sigma: Any, kind: str, bound: str, verb: str) -> None:
    """``alpha``/``sigma`` given as Python or numpy numbers must be finite and satisfy ``bound`` (``"> 0"`` or
    ``">= 0"``); tensors are not checked (that would sync the device)."""
    for name, value in (("alpha", alpha), ("sigma", sigma)):
        if isinstance(value, torch.Tensor):
            continue
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        if not number or not math.isfinite(value) or not (value > 0 if bound == "> 0" else value >= 0):
            raise ValueError(f"`{name}` must be a finite number {bound} (or a tensor) to {verb} a {kind!r} output, "
                             f"got {value!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a solver update is computed in for samples of ``dtype``: float32 for half precision (float16,
    bfloat16), else ``dtype`` itself; results go back to the sample's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def resume_precision(sample: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``sample`` (half precision: the rounded copy of ``full`` a step returned, perhaps edited since) in ``full``'s
    dtype, continuing from ``full`` where the caller left it as returned: elements equal to ``full`` after rounding
    are taken from ``full``, edited ones (an inpainting blend, a callback) are the caller's, and the gradient is
    ``sample``'s. Elementwise on the device, no host sync: what keeps increments below half a float16/bfloat16 ULP
    from being rounded away at every step (the schedulers' ``working_sample``, the CUDA-graph step's static state)."""
    x = sample.to(full.dtype)
    same = sample == full.to(sample.dtype)
    if x.requires_grad:  # the kept value, with the gradient of the caller's tensor (metadata test: no sync)
        full = full.detach() + (x - x.detach())
    return torch.where(same, full, x)
