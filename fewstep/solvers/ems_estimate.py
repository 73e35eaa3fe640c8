"""Streamed estimation of DPM-Solver-v3's empirical model statistics (v3 sec. 3.2 and app. C.1).

At each point ``lambda_i`` of a grid uniform in ``lambda``, for samples ``x = alpha x0 + sigma z`` (``x0`` from
data or model samples, ``z`` standard normal):

* ``l = E[diag(sigma d eps/dx)]``, by Hutchinson's diagonal estimator with Rademacher probes ``v``:
  ``E[v * (sigma J v)]`` -- one forward-mode JVP per probe (``torch.func.jvp``);
* ``f = (sigma eps - l x)/alpha`` and its total derivative along the PF-ODE
  ``f' = e^{-lambda}((l - 1) eps + eps') - (dl/dlambda) x/alpha``, where
  ``eps' = d_lambda eps + J (dx/dlambda)`` (one more JVP, tangent ``(dx/dlambda, 1)``,
  ``dx/dlambda = (d log alpha/dlambda) x - sigma eps``);
* ``s = Cov(f, f')/Var(f)`` and ``b = E f' - s E f``, the per-element least squares of ``f' ~ s f + b``.

Because ``f`` and ``f'`` are linear in ``l`` and ``dl/dlambda`` with coefficients ``u = e^{-lambda} eps``,
``y = x/alpha`` and ``w = e^{-lambda} eps'``, one pass suffices: it keeps per grid point running sums of
``v*(sigma J v)``, ``u, y, w`` and the products ``uu, uy, yy, uw, yw`` (float64), so memory is
O(batch x sample) for the model and O(grid x sample) for the sums, never O(samples x grid x sample) -- the
"2000 GiB" of a naive implementation. ``l, s, b`` are formed at the end; ``dl/dlambda`` by central differences.
Every (grid point, batch) draws its noise from its own seed, so a resumed run gives the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._checks import MISSING, check_int, differing_keys
from .ems import EMS
from .grids import MIN_LAMBDA_GAP
from .parameterization import normalize_prediction_type, to_pair
from .schedules import FlowSchedule, NoiseSchedule, VPSchedule

__all__ = [
    "TIME_DERIVATIVES", "forward_ad_safe", "EMSAccumulator", "estimate_ems", "ems_lambdas", "model_eps_fn",
    "SUM_KEYS", "EpsFn",
]

#: how the time part of the total derivative eps' is taken (see ``estimate_ems``)
TIME_DERIVATIVES = ("jvp", "difference")
#: the running sums kept per grid point and element
SUM_KEYS = ("jdiag", "u", "y", "w", "uu", "uy", "yy", "uw", "yw")
_CHECKPOINT_FORMAT = "fewstep.ems.checkpoint"
#: the estimator's numerics, recorded in a checkpoint's settings: a checkpoint from an estimator that computed
#: differently is refused, not resumed into a table mixing the two (2: the second-order end rule of the
#: ``"difference"`` time derivative; checkpoints before it record none). Bump it when the estimates change.
ESTIMATOR_VERSION = 2
#: a per-element variance of f below this (relative to the moments it is computed from) is zero: s = 0, b = E f'
_VAR_FLOOR = 1e-9

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ems_lambdas(schedule: NoiseSchedule, num_intervals: int, t_start: float | None = None,
                t_end: float | None = None) -> np.ndarray:
    """``num_intervals + 1`` values uniform in ``lambda`` from ``lambda(t_start)`` (noisiest) to ``lambda(t_end)``."""
    check_int("num_intervals", num_intervals, 2, numpy_ok=False)
    if isinstance(schedule, FlowSchedule):
        T = schedule.num_train_timesteps
        lo_t, hi_t = 1.0, T - 1.0  # s = 0 and s = 1 have infinite lambda
    else:
        lo_t, hi_t = schedule.t_min, schedule.t_max
    t_start = hi_t if t_start is None else float(t_start)
    t_end = lo_t if t_end is None else float(t_end)
    if not (lo_t <= t_end < t_start <= hi_t):
        raise ValueError(f"need {lo_t} <= t_end < t_start <= {hi_t}, got t_start={t_start!r}, t_end={t_end!r}")
    lam = np.linspace(float(schedule.lambda_(t_start)), float(schedule.lambda_(t_end)), num_intervals + 1)
    step = (lam[-1] - lam[0]) / num_intervals
    if step < MIN_LAMBDA_GAP:  # what EMS would refuse after the whole estimation
        raise ValueError(f"`num_intervals`={num_intervals} over t in [{t_end:g}, {t_start:g}] (lambda {lam[0]:.6g} to "
                         f"{lam[-1]:.6g}) gives a grid spacing of {step:.3g} in lambda, below the minimum "
                         f"{MIN_LAMBDA_GAP:g} EMS tables may have; use fewer intervals or a wider time range")
    return lam


def _alpha_sigma_of_lambda(schedule: NoiseSchedule, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ``alpha(lambda), sigma(lambda)``: VP ``alpha^2 = sigmoid(2 lambda)``; flow
    ``alpha = sigmoid(lambda)`` (``alpha + sigma = 1``)."""
    if isinstance(schedule, VPSchedule):
        return torch.sigmoid(2 * lam).sqrt(), torch.sigmoid(-2 * lam).sqrt()
    if isinstance(schedule, FlowSchedule):
        return torch.sigmoid(lam), torch.sigmoid(-lam)
    raise ValueError(f"EMS estimation supports VP and flow schedules, got {type(schedule).__name__}")


class EMSAccumulator:
    """Running per-element sums at every grid point; ``finalize`` turns them into :class:`EMS`."""

    def __init__(self, lambdas: np.ndarray, sample_shape: tuple[int, ...], meta: Mapping[str, Any] | None = None):
        self.lambdas = np.asarray(lambdas, dtype=np.float64)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.sums = torch.zeros((self.lambdas.size, len(SUM_KEYS), *self.sample_shape), dtype=torch.float64)
        self.counts = np.zeros(self.lambdas.size, dtype=np.int64)
        #: batches finished per grid point (resume skips them)
        self.batches = np.zeros(self.lambdas.size, dtype=np.int64)
        self.meta = dict(meta or {})

    def add(self, i: int, jdiag: torch.Tensor, u: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
        """Add one batch (``[B, *sample_shape]`` each) at grid point ``i``."""
        parts = [jdiag, u, y, w, u * u, u * y, y * y, u * w, y * w]
        stacked = torch.stack([p.detach().to(torch.float64).sum(0).cpu() for p in parts])
        self.sums[i] += stacked
        self.counts[i] += int(u.shape[0])
        self.batches[i] += 1

    def means(self) -> dict[str, np.ndarray]:
        if np.any(self.counts == 0):
            missing = np.flatnonzero(self.counts == 0)[:8].tolist()
            raise ValueError(f"EMS estimation is incomplete: grid points {missing} have no samples")
        shape = (-1, 1) + (1,) * len(self.sample_shape)
        m = (self.sums / torch.from_numpy(self.counts.astype(np.float64)).reshape(shape)).numpy()
        return {k: m[:, j] for j, k in enumerate(SUM_KEYS)}

    def finalize(self, meta: Mapping[str, Any] | None = None) -> EMS:
        """``l``, then ``s, b`` from the moments (see the module docstring)."""
        e = self.means()
        lam = self.lambdas
        l = e["jdiag"]  # noqa: E741
        l_dot = np.gradient(l, lam, axis=0, edge_order=2)
        ef = e["u"] - l * e["y"]
        efp = (l - 1.0) * e["u"] + e["w"] - l_dot * e["y"]
        ef2 = e["uu"] - 2 * l * e["uy"] + l * l * e["yy"]
        effp = ((l - 1.0) * e["uu"] + e["uw"] - l_dot * e["uy"] - l * (l - 1.0) * e["uy"] - l * e["yw"]
                + l * l_dot * e["yy"])
        var = ef2 - ef * ef
        cov = effp - ef * efp
        # Var f is a difference of moments of size E[u^2] + l^2 E[y^2]: below a relative 1e-9 of that, s = 0 and
        # b = E f'. That covers rounding (f constant, e.g. Gaussian data) but also a small real variance (5.8e-11
        # relative at the noisiest points of a two-point mixture, least-squares s 0.7-3.3): a floor of 1e-12 kept
        # those and scored worse on the estimator's mixture test, so the floor stays a deliberate choice
        ok = var > _VAR_FLOOR * (e["uu"] + l * l * e["yy"] + 1e-300)
        s = np.where(ok, cov / np.where(ok, var, 1.0), 0.0)
        b = efp - s * ef
        info = {**self.meta, **(meta or {})}
        return EMS(lam, l, s, b, info)

    # -------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the running sums, grid and progress to the safetensors checkpoint ``path`` (atomically)."""
        from safetensors.torch import save_file

        from .._io import atomic_write

        tensors = {"sums": self.sums.contiguous(), "lambdas": torch.from_numpy(self.lambdas),
                   "counts": torch.from_numpy(self.counts), "batches": torch.from_numpy(self.batches)}
        header = {"format": _CHECKPOINT_FORMAT, "meta": json.dumps(self.meta, sort_keys=True)}
        return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike) -> EMSAccumulator:
        """Read a checkpoint written by :meth:`save`. A file that is none, or a damaged one (a tensor missing or of
        the wrong shape, a ``meta`` header that is no JSON object), is a ``ValueError`` naming the file."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = dict(f.metadata() or {})
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors has its own error types
            raise ValueError(f"{path} is not a readable EMS checkpoint: {exc}") from exc
        if header.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not an EMS checkpoint (format {header.get('format')!r})")

        def damaged(what: str) -> ValueError:
            return ValueError(f"EMS checkpoint {str(path)!r} is damaged: {what}; delete it to start over")

        missing = [k for k in ("sums", "lambdas", "counts", "batches") if k not in t]
        if missing:
            raise damaged(f"it lacks the tensor(s) {', '.join(missing)}")
        try:
            meta = json.loads(header.get("meta", "{}"))
        except json.JSONDecodeError as exc:
            raise damaged(f"its `meta` header is not valid JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise damaged(f"its `meta` header must be a JSON object, got {type(meta).__name__}")
        lambdas, sums, counts, batches = t["lambdas"], t["sums"], t["counts"], t["batches"]
        n = lambdas.shape[0] if lambdas.ndim == 1 else -1
        if n < 2 or not lambdas.dtype.is_floating_point:
            raise damaged(f"`lambdas` must be a 1-d float tensor of >= 2 grid points, got {lambdas.dtype} of shape "
                          f"{tuple(lambdas.shape)}")
        if sums.ndim < 3 or tuple(sums.shape[:2]) != (n, len(SUM_KEYS)) or not sums.dtype.is_floating_point:
            raise damaged(f"`sums` must be a float tensor [{n}, {len(SUM_KEYS)}, *sample_shape] ({n} grid points), "
                          f"got {sums.dtype} of shape {tuple(sums.shape)}")
        for name, value in (("counts", counts), ("batches", batches)):
            if tuple(value.shape) != (n,) or value.dtype.is_floating_point or value.dtype == torch.bool:
                raise damaged(f"`{name}` must be an integer tensor [{n}] (one per grid point), got {value.dtype} of "
                              f"shape {tuple(value.shape)}")
            if bool((value < 0).any()):
                raise damaged(f"`{name}` holds negative values")
        if not bool(torch.isfinite(sums).all()):
            bad = (~torch.isfinite(sums.reshape(n, -1))).any(1).nonzero().flatten()[:8].tolist()
            raise damaged(f"`sums` hold NaN/Inf at grid points {bad}")
        _check_progress(counts.numpy().astype(np.int64), batches.numpy().astype(np.int64), meta.get("settings"),
                        damaged)
        unstarted = (batches == 0).nonzero().flatten()
        if unstarted.numel() and bool(sums[unstarted].ne(0).any()):  # a resumed run adds its batches to these sums
            raise damaged(f"grid points {unstarted[:8].tolist()} have no finished batch but nonzero `sums`")
        acc = cls(lambdas.numpy(), tuple(sums.shape[2:]), meta)
        acc.sums = sums.to(torch.float64)
        acc.counts = counts.numpy().astype(np.int64)
        acc.batches = batches.numpy().astype(np.int64)
        return acc


def _check_progress(counts: np.ndarray, batches: np.ndarray, settings: Any, damaged: Callable[[str], ValueError]
                    ) -> None:
    """A checkpoint's ``counts`` (samples summed per grid point) must be what its ``batches`` (batches finished per
    grid point) add up to under its settings: ``min(batches * batch_size, num_samples)``, with at most
    ``ceil(num_samples / batch_size)`` batches. Checkpoints without those settings are only checked for
    ``counts >= batches`` (every batch holds a sample)."""
    bs = settings.get("batch_size") if isinstance(settings, dict) else None
    k = settings.get("num_samples") if isinstance(settings, dict) else None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (bs, k)):
        wrong = np.flatnonzero(counts < batches)
        if wrong.size:
            i = int(wrong[0])
            raise damaged(f"grid point {i} counts {int(counts[i])} samples in {int(batches[i])} batches")
        return
    n_batches = math.ceil(k / bs)
    over = np.flatnonzero(batches > n_batches)
    if over.size:
        i = int(over[0])
        raise damaged(f"grid point {i} records {int(batches[i])} finished batches, but {k} samples in batches of "
                      f"{bs} make {n_batches}")
    expected = np.minimum(batches * bs, k)  # (batches <= n_batches: no overflow)
    wrong = np.flatnonzero(counts != expected)
    if wrong.size:
        i = int(wrong[0])
        raise damaged(f"grid point {i} counts {int(counts[i])} samples after {int(batches[i])} batches of {bs} (of "
                      f"{k} samples: {int(expected[i])} expected)")


class forward_ad_safe:  # noqa: N801 - used as a context manager
    """Context manager making a module's normalisation layers safe for forward-mode AD.

    PyTorch's group-norm JVP views its input and fails on the non-contiguous tensors attention blocks produce
    ("view size is not compatible..."): a pre-hook hands every ``GroupNorm``/``LayerNorm`` a contiguous input.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.handles: list = []

    def __enter__(self) -> torch.nn.Module:
        for m in self.module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                self.handles.append(m.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:])))
        return self.module

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


#: ``eps_fn(x, lambda_base, dlambda) -> eps``: the noise prediction at ``lambda_base + dlambda`` (``dlambda`` a
#: 0-d tensor carrying the forward-mode tangent of ``lambda``; ``lambda_base`` a Python float).
EpsFn = Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]


def model_eps_fn(model_fn: ModelFn, schedule: NoiseSchedule, prediction_type: str = "epsilon") -> EpsFn:
    """Wrap a model ``model_fn(x, t) -> raw output`` (``t``: ``[B]`` model times) as an :data:`EpsFn`.

    Model time follows ``lambda`` to first order, ``t = t(lambda_base) + dlambda * dt/dlambda`` (exact value and
    derivative at ``dlambda = 0``); outputs of other parameterisations are converted with ``alpha(lambda)``,
    ``sigma(lambda)``, so the ``lambda``-derivative includes the conversion."""
    kind = normalize_prediction_type(prediction_type)
    cache: dict[float, tuple[float, float]] = {}

    def time_of(lam: float) -> tuple[float, float]:
        if lam not in cache:
            d = 1e-4 * max(1.0, abs(lam))
            t = float(schedule.t_of_lambda(lam))
            cache[lam] = (t, float((schedule.t_of_lambda(lam + d) - schedule.t_of_lambda(lam - d)) / (2 * d)))
        return cache[lam]

    def eps_fn(x: torch.Tensor, lam: float, dlam: torch.Tensor) -> torch.Tensor:
        t0, dt = (torch.tensor(v, dtype=dlam.dtype, device=dlam.device) for v in time_of(lam))
        # tensors, not Python floats: under torch.func.jvp a float operand turns the tangent into float64
        a, s = _alpha_sigma_of_lambda(schedule, torch.tensor(lam, dtype=dlam.dtype, device=dlam.device) + dlam)
        out = model_fn(x, (t0 + dlam * dt).expand(x.shape[0]))
        return to_pair(out, x, a, s, kind)[1]

    return eps_fn


def tensor_digest(*tensors: torch.Tensor) -> str:
    """Content hash of tensors (their float32 bytes, shapes and order)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def weights_digest(module: torch.nn.Module) -> str:
    """A cheap identity of a model's weights: every parameter's name, shape, sum and sum of squares (one host
    transfer), hashed; a changed, scaled or swapped weight changes it."""
    names, stats = [], []
    for name, p in module.named_parameters():
        names.append(f"{name}:{tuple(p.shape)}")
        q = p.detach().double()
        stats.append(torch.stack([q.sum(), q.square().sum()]))
    h = hashlib.sha256(";".join(names).encode())
    if stats:
        h.update(torch.stack(stats).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _show(value: Any) -> str:
    """A setting as the checkpoint-mismatch message prints it (``absent`` for a setting one side lacks)."""
    return "absent" if value is MISSING else repr(value)


def estimate_ems(
    eps_fn: EpsFn,
    data: torch.Tensor,
    schedule: NoiseSchedule,
    num_intervals: int = 100,
    t_start: float | None = None,
    t_end: float | None = None,
    batch_size: int = 64,
    probes: int = 1,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
    time_derivative: str = "jvp",
) -> EMS:
    """Estimate ``l, s, b`` of a noise predictor on ``num_intervals + 1`` points uniform in ``lambda``.

    ``time_derivative``: how ``d_lambda eps`` enters ``eps'``: ``"jvp"`` (the paper: forward mode through the
    model's time input, exact for models smooth in time) or ``"difference"`` (a central difference over one EMS
    grid spacing, the second-order one-sided rule at the ends; the ``x``-part stays a JVP). Models trained on
    integer timesteps vary in ``t`` on the scale of a unit step (measured on digits-eps: the local ``t``-slope swings
    by a factor of several within 5 timesteps), so the exact local derivative is mostly wiggle; a solver step sees
    the trend the difference measures.

    ``eps_fn``: an :data:`EpsFn` (:func:`model_eps_fn` wraps a diffusers-style model); it must support
    forward-mode AD (diffusers' UNets do). For a guided model pass its unconditional branch (v3 app. J.2).
    ``data``: ``[K, *sample_shape]`` clean samples (a dataset, or samples the model generated itself), on the
    device to compute on. ``checkpoint``: a file updated after every grid point; an existing one made with the
    same settings is resumed. Memory: one batch of JVPs plus ``9 x (N + 1) x sample`` float64 sums.
    """
    check_int("batch_size", batch_size, 1, numpy_ok=False)
    check_int("probes", probes, 1, numpy_ok=False)
    if time_derivative not in TIME_DERIVATIVES:
        raise ValueError(f"`time_derivative` must be one of {list(TIME_DERIVATIVES)}, got {time_derivative!r}")
    if not isinstance(data, torch.Tensor) or data.ndim < 2 or data.shape[0] < 2:
        raise ValueError(f"`data` must be a tensor [K >= 2, *sample_shape], got {getattr(data, 'shape', data)!r}")
    if not torch.isfinite(data).all():
        raise ValueError("`data` holds NaN/Inf values")
    lambdas = ems_lambdas(schedule, num_intervals, t_start, t_end)
    sample_shape = tuple(data.shape[1:])
    settings = {"num_intervals": num_intervals, "num_samples": int(data.shape[0]), "batch_size": batch_size,
                "probes": probes, "seed": seed, "time_derivative": time_derivative,
                "lambda_range": [float(lambdas[0]), float(lambdas[-1])], "sample_shape": list(sample_shape),
                # what a checkpoint must have been computed on: these data and (when the caller says) this model
                "data_digest": tensor_digest(data), "model_digest": (meta or {}).get("model_digest"),
                "estimator_version": ESTIMATOR_VERSION}
    acc = None
    if checkpoint is not None and Path(checkpoint).is_file():
        acc = EMSAccumulator.load(checkpoint)
        stored, ours = acc.meta.get("settings"), json.loads(json.dumps(settings))
        if stored != ours:
            theirs = stored if isinstance(stored, dict) else {}
            shown = "; ".join(f"{k}: {_show(theirs.get(k, MISSING))} there, {_show(ours.get(k, MISSING))} in this run"
                              for k in differing_keys(theirs, ours)) or f"stored settings {stored!r}"
            raise ValueError(f"checkpoint {str(checkpoint)!r} was made with other settings ({shown}); delete it or "
                             "use another checkpoint path")
        if acc.lambdas.shape != lambdas.shape or acc.sample_shape != sample_shape:
            raise ValueError(f"checkpoint {str(checkpoint)!r} is damaged: it holds {acc.lambdas.size} grid points of "
                             f"samples {list(acc.sample_shape)}, its settings say {lambdas.size} of "
                             f"{list(sample_shape)}; delete it to start over")
        # the grid's values too: the finished tables take their lambdas from the checkpoint (same settings give the
        # same float64 linspace; 1e-12 of the range covers a platform's last-bit differences)
        off = np.abs(acc.lambdas - lambdas) > 1e-12 * (1.0 + float(np.max(np.abs(lambdas))))
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise ValueError(f"checkpoint {str(checkpoint)!r} is damaged: its grid point {i} is lambda "
                             f"{float(acc.lambdas[i])!r}, its settings give {float(lambdas[i])!r}; delete it to start "
                             "over")
    if acc is None:
        acc = EMSAccumulator(lambdas, sample_shape, {"settings": settings})
    device = data.device
    n_batches = math.ceil(data.shape[0] / batch_size)
    todo = int(sum(max(0, n_batches - int(acc.batches[i])) for i in range(lambdas.size)))
    bar = tqdm(total=todo, desc="EMS", disable=not progress)
    for i in range(lambdas.size):
        if acc.batches[i] >= n_batches:
            continue
        for b in range(int(acc.batches[i]), n_batches):
            x0 = data[b * batch_size:(b + 1) * batch_size]
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + i * 10_007 + b)
            z = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(device)
            probe_list = [(torch.randint(0, 2, x0.shape, generator=gen).to(x0.dtype) * 2 - 1).to(device)
                          for _ in range(probes)]
            _accumulate(acc, i, eps_fn, schedule, x0, z, probe_list, lambdas, time_derivative)
            bar.update(1)
        if checkpoint is not None:
            acc.save(checkpoint)
    bar.close()
    try:
        return acc.finalize(meta)
    except ValueError as exc:  # e.g. NaN/Inf tables: a resumed run would only finalize the same sums again
        if checkpoint is None:
            raise
        raise ValueError(f"{exc} (the sums come from checkpoint {str(checkpoint)!r}: delete it to estimate them "
                         "afresh)") from None


def _time_difference(eps_fn, x, lam, eps, lambdas, i, zero) -> torch.Tensor:
    """``d eps / d lambda`` at fixed ``x`` by finite differences over the EMS grid spacing: central in the interior,
    the second-order one-sided three-point rule at the two ends (a first-order one-sided difference there was off
    by ~25% in ``b`` on a Gaussian; ``x`` is held fixed, only the model's time input moves)."""
    n = lambdas.size
    if n < 3:  # two points: the only difference there is
        other = 1 - i
        h = float(lambdas[other]) - lam
        return (eps_fn(x, lam, zero + h) - eps) / h
    if 0 < i < n - 1:
        up, down = float(lambdas[i + 1]) - lam, lam - float(lambdas[i - 1])
        return (eps_fn(x, lam, zero + up) - eps_fn(x, lam, zero - down)) / (up + down)
    sign = 1 if i == 0 else -1  # step into the grid
    h1 = abs(float(lambdas[i + sign]) - lam)
    h2 = abs(float(lambdas[i + 2 * sign]) - lam)
    e1, e2 = eps_fn(x, lam, zero + sign * h1), eps_fn(x, lam, zero + sign * h2)
    # derivative of the quadratic through (0, eps), (h1, e1), (h2, e2) at 0, along the direction `sign`
    d = (-(h1 + h2) / (h1 * h2) * eps + h2 / (h1 * (h2 - h1)) * e1 - h1 / (h2 * (h2 - h1)) * e2)
    return sign * d


def _accumulate(acc, i, eps_fn, schedule, x0, z, probe_list, lambdas, time_derivative="jvp") -> None:
    """One batch at grid point ``i``: the probe JVPs for ``l`` and the tangent-``(dx/dlambda, 1)`` JVP (or the
    ``x``-JVP plus a difference over one grid spacing in ``lambda``)."""
    lam = float(lambdas[i])
    alpha, sigma = (float(v) for v in _alpha_sigma_of_lambda(schedule, torch.tensor(lam, dtype=torch.float64)))
    x = alpha * x0 + sigma * z
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    # fused attention kernels have no forward-mode AD: use the composite (math) attention for the JVPs
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        jdiag = torch.zeros_like(x)
        eps = None
        for v in probe_list:
            eps, jv = torch.func.jvp(lambda xx: eps_fn(xx, lam, zero), (x,), (v,))
            jdiag = jdiag + sigma * jv * v
        jdiag = jdiag / len(probe_list)
        # d log(alpha)/d lambda: sigma^2 for VP (alpha^2 + sigma^2 = 1), sigma for flow (alpha + sigma = 1)
        dlogalpha = sigma * sigma if isinstance(schedule, VPSchedule) else sigma
        dx = dlogalpha * x - sigma * eps
        if time_derivative == "jvp":
            _, deps = torch.func.jvp(lambda xx, dl: eps_fn(xx, lam, dl), (x, zero), (dx, torch.ones_like(zero)))
        else:
            _, deps = torch.func.jvp(lambda xx: eps_fn(xx, lam, zero), (x,), (dx,))
            deps = deps + _time_difference(eps_fn, x, lam, eps, lambdas, i, zero)
    scale = math.exp(-lam)
    acc.add(i, jdiag, scale * eps, x / alpha, scale * deps)
