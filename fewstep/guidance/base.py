"""The guidance-rule interface: conditional and unconditional ``(x0, eps)`` pairs in, one pair out.

DESIGN contract 2: every model evaluation is converted at the boundary into a pair ``(x0, eps)`` with
``x_t = alpha x0 + sigma eps``. A guidance rule combines the conditional pair ``(x0_c, eps_c)`` and the
unconditional pair ``(x0_u, eps_u)`` taken at the same ``x_t`` into the pair the solver consumes
(``scheduler.step_pair``). CFG and APG return a consistent pair; CFG++ deliberately does not (guided ``x0``
for the data term, unconditional ``eps`` for the renoise term).

Per-step code does tensor arithmetic only: the step state holds Python floats computed on the host
before sampling, so no rule reads a tensor back (no ``.item()``, no branch on tensor values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .._checks import check_bool, check_int, check_number
from ..solvers.parameterization import normalize_prediction_type

__all__ = ["Pair", "StepState", "GuidanceRule"]

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StepState:
    """Where the solver is: evaluation ``index`` of ``num_steps`` at ``x_t = alpha x0 + sigma eps``.

    ``alpha`` and ``sigma`` are host floats (``sigma > 0`` at every evaluation point); ``prediction_type`` is what
    the model outputs (``epsilon``, ``sample``, ``v_prediction``, ``flow``): rules that act on the raw output as
    diffusers does (CFG's ``guidance_rescale``) need it. ``repeat``: a second model call at this grid point (an s3
    schedule's implicit corrector evaluates the model twice there); a rule resets its state at the first call of
    point 0 only.
    """

    index: int
    num_steps: int
    alpha: float
    sigma: float
    prediction_type: str = "epsilon"
    repeat: bool = False

    def __post_init__(self) -> None:
        # numpy scalars are accepted and stored as Python numbers (host values: no tensor is read back)
        index = check_int("index", self.index, 0)
        steps = self.num_steps
        if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)) or steps <= index:
            raise ValueError(f"`num_steps` must be an integer > index ({index}), got {steps!r}")
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "num_steps", int(steps))
        object.__setattr__(self, "alpha", check_number("alpha", self.alpha, 0.0))
        object.__setattr__(self, "sigma", check_number("sigma", self.sigma, 0.0, low_open=True))
        object.__setattr__(self, "prediction_type", normalize_prediction_type(self.prediction_type))
        object.__setattr__(self, "repeat", check_bool("repeat", self.repeat, numpy_ok=True))


def _check_pair(name: str, pair: object) -> Pair:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, torch.Tensor) for p in pair)):
        raise TypeError(f"`{name}` must be an (x0, eps) pair of tensors, got {type(pair).__name__}")
    x0, eps = pair
    if x0.shape != eps.shape:
        raise ValueError(f"`{name}`: x0 and eps shapes differ: {tuple(x0.shape)} vs {tuple(eps.shape)}")
    return x0, eps


class GuidanceRule:
    """Base class of guidance rules; subclasses implement ``combine``.

    Call the rule as ``rule(cond, uncond, state)``; call ``reset()`` before each generation (rules with
    state across steps, e.g. APG's momentum, also reset themselves at step index 0). Every rule other than plain CFG
    runs on a solver that takes the ``(x0, eps)`` pair (``step_pair``): CFG++'s pair deliberately breaks
    ``x_t = alpha x0 + sigma eps``, and APG combines in x0 space.
    """

    name: ClassVar[str] = ""
    #: whether the rule reads the unconditional prediction (a host-side flag, fixed per generation)
    needs_uncond: bool = True

    def reset(self) -> None:
        """Forget state carried across steps (start of a new generation)."""

    def combine(self, cond: Pair, uncond: Pair, state: StepState) -> Pair:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, cond: Pair, uncond: Pair, state: StepState) -> Pair:
        cond, uncond = self.check_inputs(cond, uncond, state)
        if state.index == 0 and not state.repeat:  # (an implicit corrector's second call keeps the state)
            self.reset()
        return self.combine(cond, uncond, state)

    def check_inputs(self, cond: Pair, uncond: Pair, state: StepState) -> tuple[Pair, Pair]:
        """The validated pairs (what ``__call__`` checks before ``combine``; loops that run the steps in another
        order, such as inversion, call ``combine`` after this and reset the rule themselves)."""
        cond = _check_pair("cond", cond)
        uncond = _check_pair("uncond", uncond)
        if cond[0].shape != uncond[0].shape:
            raise ValueError(
                f"conditional and unconditional predictions must have the same shape (batch included); got "
                f"{tuple(cond[0].shape)} and {tuple(uncond[0].shape)}"
            )
        if not isinstance(state, StepState):
            raise TypeError(f"`state` must be a StepState, got {type(state).__name__}")
        return cond, uncond

    def history_pair(self, cond: Pair, uncond: Pair) -> Pair | None:
        """The pair a multistep solver should remember for this evaluation (its later derivative terms read it), when
        it differs from the pair the rule returns; ``None`` (the default): the returned pair. Called after the rule,
        with the same (validated) pairs."""
        return None

    def config(self) -> dict:
        """The rule's parameters (for reports and ``repr``; the constructor's keyword arguments)."""
        return {}

    def with_scale(self, guidance_scale: Any) -> GuidanceRule:
        """A new rule of this kind and with these settings, ``guidance_scale`` in place of this one's (per-step
        state such as APG's momentum is not carried over)."""
        config = self.config()
        if "guidance_scale" not in config:
            raise ValueError(f"{type(self).__name__} has no `guidance_scale` to replace (its config: {config})")
        return type(self)(**{**config, "guidance_scale": guidance_scale})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
