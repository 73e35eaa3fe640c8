"""Shared argument validation: integer and real-number checks with uniform error messages."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["MISSING", "check_bool", "check_int", "check_number", "differing_keys", "repeated_values", "stored_float64"]


def _range_text(low: float | None, high: float | None, low_open: bool = False, value: float | None = None) -> str:
    def show(bound: float) -> str:
        if not isinstance(bound, float):
            return str(bound)
        short = float(f"{bound:g}")  # exact when rounding would carry the bound past the refused value
        past = value is not None and min(bound, short) <= value <= max(bound, short) and short != bound
        return repr(bound) if past else f"{bound:g}"

    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{show(low)}, {show(high)}]"
    if low is not None:
        return f" {'>' if low_open else '>='} {show(low)}"
    if high is not None:
        return f" <= {show(high)}"
    return ""


def _label(name: str, what: str | None) -> str:
    return f"`{name}`" + (f" ({what})" if what else "")


def check_int(name: str, value: Any, low: int | None = 1, high: int | None = None, *, numpy_ok: bool = True,
              what: str | None = None) -> int:
    """Return ``int(value)`` if ``value`` is an integer in ``[low, high]`` (bounds inclusive, ``None``: unbounded).

    Bools are rejected; numpy integers are accepted only when ``numpy_ok``. Raises ``ValueError`` naming ``name``
    (followed by ``what`` in parentheses when given, e.g. the paper's symbol), the allowed range and ``value``
    otherwise.
    """
    if not numpy_ok and isinstance(value, np.integer) and not isinstance(value, np.bool_):
        raise ValueError(f"{_label(name, what)} must be a Python int{_range_text(low, high)}, got the numpy integer "
                         f"{value!r} (pass int(...))")
    types: tuple[type, ...] = (int, np.integer) if numpy_ok else (int,)
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, types)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        raise ValueError(f"{_label(name, what)} must be an integer{_range_text(low, high)}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any, *, numpy_ok: bool = False) -> bool:
    """Return ``bool(value)`` if ``value`` is a bool (a numpy bool too when ``numpy_ok``); ``ValueError`` naming
    ``name`` and ``value`` otherwise (a string such as ``"False"`` is truthy: refused, never guessed)."""
    if not isinstance(value, (bool, np.bool_) if numpy_ok else bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}")
    return bool(value)


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    finite: bool = True,
    allowed: str | None = None,
    what: str | None = None,
) -> float:
    """Return ``float(value)`` if ``value`` is a real number (int, float, numpy floating/integer or a 0-d real numpy
    array; not bool, not a tensor: reading one would sync the device, e.g. inside a scheduler's ``step``) in range.

    ``low`` is inclusive unless ``low_open``; ``high`` is inclusive. NaN is always rejected, infinities unless
    ``finite=False``. Raises ``ValueError`` naming ``name``, the allowed range (``allowed``, when given, replaces
    the text derived from the bounds, e.g. ``"(-1, 1)"`` for a bound the flags cannot say) and ``value`` otherwise;
    ``what`` as in :func:`check_int`.
    """
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
    number, v = value, None
    if not ok and isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf":
        ok, number = True, value.item()
    if ok:
        try:
            v = float(number)
        except OverflowError:  # an int beyond float's range (10**400)
            v = math.inf if number > 0 else -math.inf
        ok = not math.isnan(v) and (not finite or math.isfinite(v))
        if ok and low is not None:
            ok = v > low if low_open else v >= low
        if ok and high is not None:
            ok = v <= high
    if not ok:
        kind = "a finite number" if finite else "a number"
        text = f" in {allowed}" if allowed is not None else _range_text(low, high, low_open, v)
        raise ValueError(f"{_label(name, what)} must be {kind}{text}, got {value!r}")
    return v


def repeated_values(values: Any) -> list[str]:
    """The values a list names more than once (as sorted strings; empty when all are distinct): lists of cells to run
    refuse them, since a repeat would run and report its cells twice."""
    values = list(values)
    return sorted({str(v) for v in values if values.count(v) > 1})


_STORED_REAL_DTYPES = ("float16", "bfloat16", "float32", "float64")


def stored_float64(name: str, tensor: Any, ndim: int | None = None, finite: bool = True) -> np.ndarray:
    """A tensor read from an artifact file as a float64 array (half precision upcast).

    Refuses other dtypes (complex, integer, bool), a rank other than ``ndim`` (when given) and, when ``finite``,
    NaN/Inf; messages name the tensor. Callers prefix the file's name."""
    dtype = str(tensor.dtype).replace("torch.", "")
    if dtype not in _STORED_REAL_DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {dtype}; it must hold real floating-point numbers "
                         f"({', '.join(_STORED_REAL_DTYPES[:-1])} or {_STORED_REAL_DTYPES[-1]})")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"tensor {name!r} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    values = tensor.double().numpy()
    if finite and not np.all(np.isfinite(values)):
        raise ValueError(f"tensor {name!r} must be finite, got {values.reshape(-1)[:12].tolist()}")
    return values


#: a key one of two mappings lacks (``differing_keys``): unlike ``None``, it never equals a stored value
MISSING = object()


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The keys, sorted, whose values differ between two mappings of settings; a key only one of them has differs
    (read it back with ``mapping.get(key, MISSING)``). What the "made with other settings" refusals name."""
    return sorted(k for k in set(a) | set(b) if a.get(k, MISSING) != b.get(k, MISSING))


#: the advice for an output with twice the sample's batch in a sampler's ``step`` (a CFG loop that forgot to combine)
CFG_HALVES_ADVICE = ("combine the guidance halves first (diffusers' CFG: uncond, cond = noise_pred.chunk(2); "
                     "noise_pred = uncond + scale * (cond - uncond))")


def check_output_shape(
    reference: Any, *, of: str = "sample", whose: str = "the sample's", unit: str = "sample",
    doubled: str = CFG_HALVES_ADVICE, prefix: str = "", **outputs: Any,
) -> None:
    """Each model output (keyword: its name) must have the shape of ``reference`` (named ``of`` in the message;
    ``whose``/``unit`` word the hints: "the sample's", "sample"), checked on metadata only (no host sync). The
    message says what the usual mistakes were: twice the batch (``doubled``: what to do instead) or twice the
    channels (a learned-variance model: its first half is the mean). ``prefix`` names the output's owner
    (``"`model_fn`'s "``). Without such a check the pair conversion broadcast the output silently."""
    for name, out in outputs.items():
        if out.shape == reference.shape:
            continue
        got, want = tuple(out.shape), tuple(reference.shape)
        same_rank = out.ndim == reference.ndim >= 2
        hint = f"one output per {unit}, of {whose} shape"
        if same_rank and out.shape[0] == 2 * reference.shape[0] and out.shape[1:] == reference.shape[1:]:
            hint = f"it holds twice {whose} batch: {doubled}"
        elif (same_rank and out.shape[0] == reference.shape[0] and out.shape[1] == 2 * reference.shape[1]
              and out.shape[2:] == reference.shape[2:]):
            c = reference.shape[1]
            hint = (f"it has twice {whose} channels ({2 * c} vs {c}): a learned-variance model (mean and "
                    f"variance); pass its first half, {name}[:, :{c}], the mean prediction, as diffusers' pipelines "
                    "for such models (DiT, DeepFloyd IF) split it")
        raise ValueError(f"{prefix}`{name}` must have the shape of `{of}` {want}, got {got}: {hint}")
