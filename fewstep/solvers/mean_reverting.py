"""Mean-reverting (IR-SDE) diffusion, reduced to the VP engine: the math behind MRS (Li et al. 2025).

The MR-SDE ``dx = theta_t (mu - x) dt + g_t dw`` with ``g_t^2 = 2 lam^2 theta_t`` has the marginal
``x_t = a_t x0 + (1 - a_t) mu + s_t eps``, ``a_t = exp(-int_0^t theta)``, ``s_t = lam sqrt(1 - a_t^2)`` (MRS,
sec. 3). With ``z = (x - mu) / lam`` it is the VP process ``z_t = a_t z0 + sqrt(1 - a_t^2) eps``: the MRS
ODE/SDE solvers in noise and data form (MRS sec. 4, eqs. for ``x_t`` in terms of ``x_s``, ``mu`` and the
network integral over ``lambda``) are DPM-Solver/DPM-Solver++ and their SDE variants on ``z``; the
``mu``-terms of the paper's updates are what ``x = mu + lam z`` gives back. So MRS needs no second copy
of the exponential-integrator math, only these conversions:

* ``epsilon``: the noise is the same in both spaces;
* ``sample`` (data): ``z0 = (x0 - mu) / lam``;
* ``v_prediction`` (MRS's velocity ``v = lam a_t eps - (s_t / lam)(x0 - mu)``): ``v_z = v / lam``, the usual
  velocity ``a eps - sqrt(1 - a^2) z0`` of the ``z`` process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._checks import check_number

__all__ = [
    "MR_PREDICTIONS",
    "check_stationary_std",
    "check_measurement",
    "to_z",
    "from_z",
    "model_output_to_z",
    "mean_reverting_betas",
]

MR_PREDICTIONS = ("epsilon", "sample", "v_prediction")


def check_stationary_std(lam: float, name: str = "stationary_std") -> float:
    """The MR-SDE's stationary std ``lam`` (IR-SDE: 50/255 for 8-bit images in [0, 1]) must be > 0."""
    return check_number(name, lam, 0, low_open=True, what="the MR-SDE's stationary std lambda")


def check_measurement(mu: torch.Tensor | None, sample: torch.Tensor, name: str = "mu") -> torch.Tensor:
    """The degraded image ``mu`` the MR-SDE reverts to: a tensor shaped like the sample."""
    if mu is None:
        raise ValueError(
            f"`{name}` is required: a mean-reverting model restores towards the degraded image mu "
            "(pass it to every step)"
        )
    if not isinstance(mu, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor shaped like the sample, got {type(mu).__name__}")
    if mu.shape != sample.shape:
        raise ValueError(f"`{name}` must have the sample's shape {tuple(sample.shape)}, got {tuple(mu.shape)}")
    return mu


def _check_lam(lam: Any) -> None:
    if isinstance(lam, (int, float, np.integer, np.floating)):  # a tensor is not checked (no device sync)
        check_number("lam", lam, 0.0, low_open=True)


def to_z(x: torch.Tensor, mu: torch.Tensor, lam: float) -> torch.Tensor:
    """``z = (x - mu) / lam``: the VP-normalised state."""
    _check_lam(lam)
    return (x - mu) / lam


def from_z(z: torch.Tensor, mu: torch.Tensor, lam: float) -> torch.Tensor:
    """``x = mu + lam z``."""
    _check_lam(lam)
    return mu + lam * z


def model_output_to_z(output: torch.Tensor, mu: torch.Tensor, lam: float, prediction_type: str) -> torch.Tensor:
    """The model output of an MR model, re-expressed for the ``z`` process (same ``prediction_type``)."""
    _check_lam(lam)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "sample":
        return (output - mu) / lam
    if prediction_type == "v_prediction":
        return output / lam
    raise ValueError(f"`prediction_type` of a mean-reverting model must be one of {list(MR_PREDICTIONS)}, "
                     f"got {prediction_type!r}")


def mean_reverting_betas(num_steps: int = 100, a_end: float = 0.005) -> list[float]:
    """The IR-SDE cosine MR schedule as ``num_steps + 1`` VP betas (``alphas_cumprod = a_i^2``, ``i = 0..T``)."""
    from .schedules import mean_reverting_alphas_cumprod

    abar = mean_reverting_alphas_cumprod(num_steps, a_end)
    prev = np.concatenate([[1.0], abar[:-1]])
    return (1.0 - abar / prev).tolist()
