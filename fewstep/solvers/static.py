"""A compiled ``Plan`` as device tensors and an engine state in fixed buffers: one step function for every step.

``EngineState.advance`` reads its coefficients as Python floats of step ``i``; a CUDA graph captured around it
would freeze the coefficients of the step it was captured at. ``StaticEngine`` instead stacks every step's
coefficients into one device table and selects a row with a step-index tensor that lives on the device
(``index_select``, no host sync), and keeps the evaluation buffer, the last sample and the noise of stochastic
steps in tensors of fixed shape that are updated in place. The same ``advance`` then serves every step, so
one captured step can be replayed for all of them; run uncaptured (CPU) it computes what ``EngineState`` does.

**Linear form.** Every transition of the engine (pair form and DPM-Solver-v3's per-element EMS form) is a
linear map of the buffered evaluations, the start sample and the step's noise. A transition is stored as:
a one-hot ``sel`` over buffer slots (its base evaluation), ``base_x0``/``base_eps`` (weights of the base pair),
``lin`` (weight of ``x_start - x_base^eval``), ``const``, per-slot weights ``w_x0``/``w_eps`` on the buffered
fields, and ``noise``. ``advance`` evaluates them in the order ``EngineState`` does, and steps without a
corrector get an identity "corrector" (the newest evaluation point), so unused slots only ever add exact zeros:
on the CPU the static path reproduces the eager one bit for bit (tested).

Not expressible here (refused by :func:`check_static_plan`): momentum (heavy-ball/GHVB) and step hooks
(DC-Solver, FlowChef).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .ems import EMSTransition
from .engine import Plan, Transition

__all__ = ["StaticEngine", "check_static_plan", "transition_rows"]

# rows of one transition in the coefficient table (each row broadcasts against one sample)
_SEL, _BX0, _BEPS, _LIN, _CONST, _WX0, _WEPS, _TX0, _TEPS, _XE = range(10)
_NUM_ROWS = 10


def check_static_plan(plan: Plan, hooks: Sequence = ()) -> None:
    """Raise if ``plan`` (with the scheduler's step ``hooks``) cannot run as a static step."""
    if plan.momentum is not None and any(m is not None for m in plan.momentum):
        raise ValueError(
            "momentum samplers (hb, ghvb) carry a direction history that the static step does not model; "
            "use ddim, dpm-solver++, unipc or dpm-solver-v3 in graph mode"
        )
    if plan.analytic_start is not None:
        raise ValueError(
            "solver schedules with an analytical first step (s3 schedules with `afs`: zero_x0 or average_x0) buffer "
            "an extra analytic point that "
            "the static step does not model; run them eagerly, or use a schedule without `afs` in graph mode"
        )
    if any(step.reevaluate for step in plan.steps):
        raise ValueError(
            "solver schedules with an implicit corrector (s3, corrector='implicit') call the model twice at a time "
            "point, which the static step does not model; run them eagerly, or use corrector='unic' in graph mode"
        )
    if hooks:
        raise ValueError(
            f"samplers with step hooks ({', '.join(type(h).__name__ for h in hooks)}: DC-Solver, FlowChef) "
            "cannot run as a static step; use ddim, dpm-solver++, unipc or dpm-solver-v3 in graph mode"
        )


def transition_rows(tr: Transition | EMSTransition | None, buffer_size: int, elem: tuple[int, ...]) -> np.ndarray:
    """The coefficient rows ``(10, buffer_size, *elem)`` (float64) of one transition; ``None``: the identity that
    returns the newest evaluation point (the "corrector" of steps without one).

    Rows: one-hot base slot, weight of the base ``x0``/``eps``, ``lin`` (on ``x_start - x_base^eval``), ``const``,
    per-slot weights on ``x0``/``eps``, the weight of ``-x0_base``/``-eps_base`` (the pair form's
    ``-sum(w) F_base``) and of ``x_base^eval`` (identity only). Scalars sit in slot 0."""
    rows = np.zeros((_NUM_ROWS, buffer_size, *elem), dtype=np.float64)
    if tr is None:
        rows[_SEL, 0] = 1.0
        rows[_XE, 0] = 1.0
        return rows
    if not 0 <= tr.base < buffer_size:
        raise ValueError(f"transition base offset {tr.base} outside the buffer of {buffer_size} evaluations")
    rows[_SEL, tr.base] = 1.0
    if isinstance(tr, EMSTransition):
        rows[_LIN, 0] = np.broadcast_to(np.asarray(tr.lin, dtype=np.float64), elem)
        rows[_CONST, 0] = np.broadcast_to(np.asarray(tr.const, dtype=np.float64), elem)
        for offset, cx, ce in tr.terms:
            rows[_WX0, offset] += np.broadcast_to(np.asarray(cx, dtype=np.float64), elem)
            rows[_WEPS, offset] += np.broadcast_to(np.asarray(ce, dtype=np.float64), elem)
        return rows
    rows[_BX0, 0] = tr.alpha_t
    rows[_BEPS, 0] = tr.sigma_t
    rows[_LIN, 0] = tr.lin
    data = tr.kind == "data"
    total = 0.0
    for offset, w in tr.weights:
        rows[_WX0 if data else _WEPS, offset] += w
        total += w
    rows[_TX0 if data else _TEPS, 0] = total
    return rows


class StaticEngine:
    """The engine of ``plan`` in fixed buffers for samples of ``shape`` (compute dtype ``dtype``) on ``device``.

    ``reset(noise)`` starts a generation (zeroed buffers, step index 0; ``noise``: ``(N, *shape)`` standard
    normal draws of the stochastic steps, or ``None`` for an ODE plan); ``advance(x_eval, x0, eps)`` consumes the
    evaluation of the current step and returns the next sample. ``index`` is the device step index: read it
    with :meth:`row` for other per-step values; the caller increments it after the step (``index.add_(1)``).
    """

    def __init__(self, plan: Plan, shape: Sequence[int], device: torch.device | str, dtype: torch.dtype,
                 hooks: Sequence = ()):
        check_static_plan(plan, hooks)
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_steps = plan.num_steps
        self.buffer_size = plan.buffer_size
        per_element = any(
            isinstance(tr, EMSTransition) and (np.ndim(tr.lin) > 0 or np.ndim(tr.const) > 0)
            for step in plan.steps for tr in (step.corrector, step.predictor) if tr is not None
        )
        elem = self.shape[1:] if per_element else (1,) * (len(self.shape) - 1)
        if per_element:
            for step in plan.steps:
                for tr in (step.corrector, step.predictor):
                    if isinstance(tr, EMSTransition) and np.ndim(tr.lin) and tuple(np.shape(tr.lin)) != elem:
                        raise ValueError(
                            f"EMS are for samples of shape {tuple(np.shape(tr.lin))}, got a batch of shape "
                            f"{self.shape}; estimate EMS for this model and resolution (`fewstep calibrate ems`)"
                        )
        table = np.stack([
            np.stack([transition_rows(step.corrector, self.buffer_size, elem),
                      transition_rows(step.predictor, self.buffer_size, elem)])
            for step in plan.steps
        ])  # (N, 2, rows, B, *elem)
        # the batch axis sits after the slot axis: (N, 2, rows, B, 1, *elem)
        table = table.reshape(*table.shape[:4], 1, *elem)
        self.table = torch.as_tensor(table, dtype=dtype).to(self.device)
        self.noise_coef = torch.as_tensor([step.predictor.noise for step in plan.steps], dtype=dtype).to(self.device)
        self.stochastic = bool(any(step.predictor.noise != 0.0 for step in plan.steps))
        b = self.buffer_size
        self.index = torch.zeros((), dtype=torch.long, device=self.device)
        self.x0 = torch.zeros((b, *self.shape), dtype=dtype, device=self.device)
        self.eps = torch.zeros_like(self.x0)
        self.x_eval = torch.zeros_like(self.x0)
        self.last = torch.zeros(self.shape, dtype=dtype, device=self.device)
        self.noise = torch.zeros((self.num_steps if self.stochastic else 1, *self.shape), dtype=dtype,
                                 device=self.device)

    def reset(self, noise: torch.Tensor | None = None) -> None:
        """Zero the buffers and the step index (start of a generation); ``noise``: the stochastic steps' draws."""
        for buf in (self.x0, self.eps, self.x_eval, self.last):
            buf.zero_()
        self.index.zero_()
        if self.stochastic:
            if noise is None or tuple(noise.shape) != tuple(self.noise.shape):
                raise ValueError(
                    f"this plan has stochastic steps: `noise` must have shape {tuple(self.noise.shape)}, got "
                    f"{None if noise is None else tuple(noise.shape)}"
                )
            self.noise.copy_(noise)

    def row(self, table: torch.Tensor) -> torch.Tensor:
        """``table[index]`` by ``index_select`` on the device step index (no host sync)."""
        return table.index_select(0, self.index.reshape(1))[0]

    def _apply(self, rows: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        """One transition from its rows, term by term in the order ``apply_transition``/``EMSTransition.apply``
        add them (zero coefficients add exact zeros)."""
        if self.buffer_size > 1:
            sel = rows[_SEL]
            base_x0, base_eps, base_xe = (sel * self.x0).sum(0), (sel * self.eps).sum(0), (sel * self.x_eval).sum(0)
        else:
            base_x0, base_eps, base_xe = self.x0[0], self.eps[0], self.x_eval[0]
        out = rows[_BX0, 0] * base_x0 + rows[_BEPS, 0] * base_eps
        out = out + rows[_LIN, 0] * (x_start - base_xe)
        out = out + rows[_CONST, 0]
        for k in range(self.buffer_size):
            out = out + rows[_WX0, k] * self.x0[k]
            out = out + rows[_WEPS, k] * self.eps[k]
        out = out - (rows[_TX0, 0] * base_x0 + rows[_TEPS, 0] * base_eps)
        return out + rows[_XE, 0] * base_xe

    def advance(self, x_eval: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Push the evaluation ``(x_eval, x0, eps)`` of the current step and return the sample at the next grid
        point (compute dtype). Tensor arithmetic only; buffers are updated in place."""
        rows = self.row(self.table)  # (2, rows, B, 1, *elem)
        if self.buffer_size > 1:
            for buf in (self.x0, self.eps, self.x_eval):
                buf[1:].copy_(buf[:-1].clone())
        self.x0[0].copy_(x0)
        self.eps[0].copy_(eps)
        self.x_eval[0].copy_(x_eval)
        x = self._apply(rows[0], self.last)
        self.last.copy_(x)
        out = self._apply(rows[1], x)
        if self.stochastic:
            out = out + self.row(self.noise_coef) * self.row(self.noise)
        return out
