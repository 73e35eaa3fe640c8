"""DC-Solver artifacts: searched ratio tables and cascade polynomial regression (CPR) coefficients.

Both are safetensors files with JSON metadata in the header: the model id, the scheduler settings that
the ratios depend on (noise schedule, grid, base solver, DC order and variable), and for ratio tables one
entry per ``(NFE, guidance scale)``. Loading checks all of it; a mismatch is a ``ValueError`` that says
what differs, never a silent fallback.

**CPR** (DC-Solver sec. 3.3, "cascade polynomial regression"): the ratio of (1-based) step ``j`` of an
``N``-step run at guidance scale ``w`` is predicted by a cubic in ``x = j/N`` whose coefficients are
quadratics in ``g = w/12`` whose coefficients in turn are quadratics in ``n = N/50``::

    rho_hat(j; N, w) = sum_{k=0..3} c_k x^k,   c_k = sum_{p=0..2} g^p sum_{q=0..2} C[k, p, q] n^q

i.e. 36 parameters ``C[k, p, q]``, linear in the features ``x^k g^p n^q``; they are fitted by (ridge-
regularised) linear least squares (``scipy.linalg.lstsq``) on ratios searched for several ``(N, w)``.
Steps that cannot be compensated (``j <= K``) are fixed to 1.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from scipy import linalg

from .._checks import check_int, stored_float64
from .dc import check_ratios

__all__ = [
    "RatioEntry",
    "CPRModel",
    "cpr_features",
    "cpr_from_released",
    "fit_cpr",
    "save_ratio_table",
    "load_ratio_table",
    "load_ratios",
    "save_cpr",
    "load_cpr",
    "RATIOS_FORMAT",
    "CPR_FORMAT",
]

RATIOS_FORMAT = "fewstep.dc.ratios"
CPR_FORMAT = "fewstep.dc.cpr"
_VERSION = "1"
_GUIDANCE_TOL = 1e-6


@dataclass
class RatioEntry:
    """Searched ratios for one ``(nfe, guidance_scale)``; ``info`` holds losses and search settings."""

    nfe: int
    guidance_scale: float
    ratios: list[float]
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_int("nfe", self.nfe, 1)
        self.nfe = int(self.nfe)
        if not isinstance(self.guidance_scale, (int, float)) or not math.isfinite(self.guidance_scale):
            raise ValueError(f"`guidance_scale` must be a finite number, got {self.guidance_scale!r}")
        self.guidance_scale = float(self.guidance_scale)
        self.ratios = [float(r) for r in self.ratios]
        if len(self.ratios) != self.nfe:
            raise ValueError(f"`ratios` has {len(self.ratios)} entries for nfe={self.nfe}; need one per step")
        check_ratios(self.ratios, self.nfe, order=0)  # finite and > 0: what the sampler accepts

    @property
    def key(self) -> str:
        return f"nfe{self.nfe}_cfg{self.guidance_scale:g}"


def _check_model(model: Any) -> str:
    if not isinstance(model, str) or not model:
        raise ValueError(f"`model` must be a non-empty string naming the model, got {model!r}")
    return model


def _check_key(scheduler_key: Any) -> dict:
    if not isinstance(scheduler_key, Mapping):
        raise ValueError(f"`scheduler_key` must be a mapping of scheduler settings, got {type(scheduler_key).__name__}")
    return json.loads(json.dumps(dict(scheduler_key), sort_keys=True))


def _compare_key(stored: dict, wanted: dict, path: Path) -> None:
    if stored == wanted:
        return
    diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
    details = ", ".join(f"{k}: file {stored.get(k)!r} vs scheduler {wanted.get(k)!r}" for k in diff)
    newer = [k for k in diff if k in _MODEL_KEYS and k not in stored]
    hint = ""
    if newer:  # a table calibrated before these entered the key holds none of them, also for such a model
        hint = (f"; the file records no {'/'.join(newer)}: it was calibrated for a model with the defaults (epsilon "
                "prediction, parametric betas, VP), or by a fewstep that did not record them -- calibrate ratios for "
                "this model (fewstep calibrate dc)")
    raise ValueError(f"{path} was made for other scheduler settings ({details}){hint}")


#: key entries that describe the model (``dc_scheduler_key`` adds them only when not the default)
_MODEL_KEYS = ("prediction_type", "trained_betas", "flow")


def _read(path: str | os.PathLike, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DC-Solver artifact {str(p)!r} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{p} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != fmt:
        raise ValueError(f"{p} is not a {fmt} file (format {meta.get('format')!r})")
    if meta.get("version") != _VERSION:
        raise ValueError(
            f"{p}: {fmt} format version {meta.get('version')!r} is not supported (this fewstep reads version "
            f"{_VERSION!r}); write it again with this fewstep (`fewstep calibrate dc`)"
        )
    return tensors, meta


def _field(meta: Mapping[str, str], name: str) -> str:
    if name not in meta:
        raise ValueError(f"metadata field {name!r} is missing")
    return meta[name]


def _json_field(meta: Mapping[str, str], name: str) -> Any:
    text = _field(meta, name)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"metadata field {name!r} is not valid JSON ({exc}): {text[:80]!r}") from None


def _object_field(meta: Mapping[str, str], name: str) -> dict:
    value = _json_field(meta, name)
    if not isinstance(value, dict):
        raise ValueError(f"metadata field {name!r} must be a JSON object, got {value!r:.80}")
    return value


def _model_field(meta: Mapping[str, str]) -> str:
    model = _field(meta, "model")
    if not model:
        raise ValueError("metadata field 'model' must name the model, got an empty string")
    return model


def _with_path(path: str | os.PathLike, what: str, parse: Any) -> Any:
    """Run ``parse()``; a ``ValueError``/``TypeError`` (or a stray ``KeyError``) becomes a ``ValueError`` naming the
    file."""
    try:
        return parse()
    except (ValueError, TypeError, KeyError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise ValueError(f"{what} {str(path)!r}: {text}") from None


def _write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    from .._io import atomic_write

    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


# ------------------------------------------------------------------------------------------------ ratios
def save_ratio_table(
    path: str | os.PathLike,
    entries: Sequence[RatioEntry],
    model: str,
    scheduler_key: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write searched ratios for several ``(nfe, guidance_scale)`` of one model and scheduler (atomic)."""
    model = _check_model(model)
    key = _check_key(scheduler_key)
    entries = list(entries)
    if not entries or not all(isinstance(e, RatioEntry) for e in entries):
        raise ValueError("`entries` must be a non-empty list of RatioEntry")
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        raise ValueError(f"`entries` holds duplicate (nfe, guidance_scale) pairs: {keys}")
    tensors = {e.key: torch.tensor(e.ratios, dtype=torch.float64) for e in entries}
    index = [{"key": e.key, "nfe": e.nfe, "guidance_scale": e.guidance_scale, "info": e.info} for e in entries]
    meta = {
        "format": RATIOS_FORMAT,
        "version": _VERSION,
        "model": model,
        "scheduler": json.dumps(key, sort_keys=True),
        "entries": json.dumps(index),
        "extra": json.dumps(dict(extra or {})),
    }
    return _write(path, tensors, meta)


def load_ratio_table(path: str | os.PathLike) -> tuple[list[RatioEntry], dict[str, Any]]:
    """All entries of a ratio table and its metadata (``model``, ``scheduler``, ``extra``), not checked against a
    scheduler; a malformed file is a ``ValueError`` naming it."""
    tensors, meta = _read(path, RATIOS_FORMAT)
    return _with_path(path, "DC-Solver ratio table", lambda: _parse_ratio_table(tensors, meta))


def _parse_ratio_table(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[list[RatioEntry], dict]:
    info = {"model": _model_field(meta), "scheduler": _object_field(meta, "scheduler"),
            "extra": _object_field(meta, "extra")}
    index = _json_field(meta, "entries")
    if not isinstance(index, list) or not index:
        raise ValueError(f"metadata field 'entries' must be a non-empty JSON list of entries, got {index!r:.80}")
    entries, seen = [], set()
    for i, item in enumerate(index):
        if not isinstance(item, dict) or not {"key", "nfe", "guidance_scale"} <= set(item):
            raise ValueError(f"entry {i} must be an object with 'key', 'nfe', 'guidance_scale' (and 'info'), "
                             f"got {item!r:.80}")
        key, nfe, cfg, extra = item["key"], item["nfe"], item["guidance_scale"], item.get("info", {})
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"entry {i}: 'nfe' must be an integer >= 1, got {nfe!r}")
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg):
            raise ValueError(f"entry {i}: 'guidance_scale' must be a finite number, got {cfg!r}")
        if not isinstance(extra, dict):
            raise ValueError(f"entry {i}: 'info' must be a JSON object, got {extra!r:.80}")
        if not isinstance(key, str) or key not in tensors:
            raise ValueError(f"entry {i}: 'key' {key!r} names no tensor of the file (it holds {sorted(tensors)})")
        ratios = stored_float64(key, tensors[key], ndim=1)
        if ratios.size != nfe:
            raise ValueError(f"entry {i} ({key!r}): {ratios.size} ratios for NFE {nfe}; need one per step")
        try:
            entry = RatioEntry(nfe, float(cfg), ratios.tolist(), extra)
        except ValueError as err:
            raise ValueError(f"entry {i} ({key!r}): {err}") from None
        if entry.key != key:
            raise ValueError(f"entry {i}: 'key' {key!r} does not match its NFE {nfe} and guidance scale {cfg!r} "
                             f"(expected {entry.key!r})")
        if key in seen:
            raise ValueError(f"entry {i}: (NFE {nfe}, guidance scale {cfg!r}) appears twice")
        seen.add(key)
        entries.append(entry)
    return entries, info


def load_ratios(
    path: str | os.PathLike, model: str, scheduler_key: Mapping[str, Any], nfe: int, guidance_scale: float
) -> list[float]:
    """The ratios stored for exactly this model, scheduler settings, NFE and guidance scale."""
    model = _check_model(model)
    wanted = _check_key(scheduler_key)
    entries, info = load_ratio_table(path)
    if info["model"] != model:
        raise ValueError(f"{path} holds ratios for model {info['model']!r}, not {model!r}")
    _compare_key(info["scheduler"], wanted, Path(path))
    for e in entries:
        if e.nfe == nfe and abs(e.guidance_scale - float(guidance_scale)) <= _GUIDANCE_TOL:
            order = wanted.get("dc_order")
            early = [r for r in e.ratios[:order] if r != 1.0] if isinstance(order, int) else []
            if early:
                raise ValueError(
                    f"{path}: entry {e.key!r} has ratios {e.ratios}; with dc_order {order} the first {order} must be "
                    "1 (too few buffered outputs to compensate them)"
                )
            return list(e.ratios)
    have = ", ".join(f"(NFE {e.nfe}, CFG {e.guidance_scale:g})" for e in entries)
    raise ValueError(
        f"{path} has no ratios for NFE {nfe} at guidance scale {float(guidance_scale):g}; it holds {have}. "
        "Search them with `fewstep calibrate dc` or use CPR coefficients"
    )


# ------------------------------------------------------------------------------------------------ CPR
def cpr_features(nfe: Any, guidance_scale: Any, step: Any) -> np.ndarray:
    """Features ``x^k g^p n^q`` (shape ``[..., 36]``, order ``k, p, q``) with ``x = step/nfe`` (1-based step),
    ``g = guidance_scale/12``, ``n = nfe/50`` (DC-Solver sec. 3.3)."""
    nfe = np.asarray(nfe, dtype=np.float64)
    g = np.asarray(guidance_scale, dtype=np.float64) / 12.0
    x = np.asarray(step, dtype=np.float64) / nfe
    n = nfe / 50.0
    x, g, n = np.broadcast_arrays(x, g, n)
    feats = [x**k * g**p * n**q for k in range(4) for p in range(3) for q in range(3)]
    return np.stack(feats, axis=-1)


def cpr_from_released(coefficients: Any) -> list[float]:
    """DC-Solver's released CPR coefficients (the ``.npy`` files of the official code, 36 values) in fewstep's
    ``C[k, p, q]`` order, for ``dc_cpr=``.

    The released evaluation nests quadratics: ``coefficients.reshape(4, 3, 3)[k, m, j]`` multiplies
    ``x^k g^(2-m) n^(2-j)`` (highest power first in CFG and NFE), whereas ``cpr_features`` orders ``x^k g^p n^q``
    with ascending powers, so the last two axes are reversed."""
    c = np.asarray(coefficients, dtype=np.float64).reshape(-1)
    if c.size != 36 or not np.all(np.isfinite(c)):
        raise ValueError(f"released CPR `coefficients` must be 36 finite numbers, got {c.size} values")
    return c.reshape(4, 3, 3)[:, ::-1, ::-1].reshape(-1).tolist()


@dataclass
class CPRModel:
    """Fitted CPR coefficients ``C[k, p, q]`` plus the fitted ``(NFE, CFG)`` range and the DC order."""

    coefficients: np.ndarray | Sequence[float]
    nfe_range: tuple[float, float] | None = None
    guidance_range: tuple[float, float] | None = None
    order: int = 2
    fitted_on: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        c = np.asarray(self.coefficients, dtype=np.float64)
        if c.size != 36 or not np.all(np.isfinite(c)):
            raise ValueError(f"CPR `coefficients` must be 36 finite numbers (C[k,p,q], 4x3x3), got {c.size} values")
        self.coefficients = c.reshape(4, 3, 3)

    def predict(self, nfe: int, guidance_scale: float, warn: bool = True) -> list[float]:
        """Ratios for an ``nfe``-step run at ``guidance_scale``; the first ``order`` are 1.

        Outside the fitted range a ``UserWarning`` says by how much (CPR extrapolates polynomially); the DC-Solver
        scheduler refuses ratios <= 0, which far extrapolation can give.
        """
        check_int("nfe", nfe, 1)
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}")
        if warn:
            for name, value, rng in (
                ("NFE", nfe, self.nfe_range),
                ("guidance scale", guidance_scale, self.guidance_range),
            ):
                if rng is None:
                    continue
                lo, hi = rng
                if value < lo or value > hi:
                    off = lo - value if value < lo else value - hi
                    side = "below" if value < lo else "above"
                    warnings.warn(
                        f"CPR asked for {name} {value:g}, {off:g} {side} its fitted range [{lo:g}, {hi:g}]; "
                        "the predicted ratios are an extrapolation",
                        UserWarning,
                        stacklevel=2,
                    )
        steps = np.arange(1, nfe + 1)
        rho = cpr_features(nfe, guidance_scale, steps) @ self.coefficients.reshape(-1)
        rho[: self.order] = 1.0
        return [float(r) for r in rho]


def fit_cpr(entries: Sequence[RatioEntry], order: int = 2, ridge: float = 1e-6) -> CPRModel:
    """Least-squares fit of the 36 CPR coefficients to searched ratios (steps ``j > K`` of every entry).

    ``ridge`` adds ``ridge * ||C||^2`` (features are O(1) by construction), which keeps the fit stable when
    fewer distinct NFE or CFG values than polynomial coefficients are given.
    """
    entries = list(entries)
    if len(entries) < 2 or not all(isinstance(e, RatioEntry) for e in entries):
        raise ValueError(f"`entries` must hold at least 2 RatioEntry (several (NFE, CFG) pairs), got {len(entries)}")
    if not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise ValueError(f"`ridge` must be a number >= 0, got {ridge!r}")
    rows, targets = [], []
    for e in entries:
        for j in range(order + 1, e.nfe + 1):
            rows.append(cpr_features(e.nfe, e.guidance_scale, j))
            targets.append(e.ratios[j - 1])
    if not rows:
        raise ValueError(f"no step beyond the first {order} in `entries`: nothing to fit")
    a = np.stack(rows)
    b = np.asarray(targets)
    if ridge > 0:
        a = np.concatenate([a, math.sqrt(ridge) * np.eye(36)])
        b = np.concatenate([b, np.zeros(36)])
    coef, *_ = linalg.lstsq(a, b)
    nfes = [e.nfe for e in entries]
    cfgs = [e.guidance_scale for e in entries]
    return CPRModel(
        coef, (min(nfes), max(nfes)), (min(cfgs), max(cfgs)), order, [(e.nfe, e.guidance_scale) for e in entries]
    )


def save_cpr(path: str | os.PathLike, cpr: CPRModel, model: str, scheduler_key: Mapping[str, Any]) -> Path:
    """Write CPR coefficients with their fitted range, model and scheduler settings (atomic)."""
    model = _check_model(model)
    key = _check_key(scheduler_key)
    if not isinstance(cpr, CPRModel):
        raise TypeError(f"`cpr` must be a CPRModel, got {type(cpr).__name__}")
    meta = {
        "format": CPR_FORMAT,
        "version": _VERSION,
        "model": model,
        "scheduler": json.dumps(key, sort_keys=True),
        "nfe_range": json.dumps(list(cpr.nfe_range) if cpr.nfe_range else None),
        "guidance_range": json.dumps(list(cpr.guidance_range) if cpr.guidance_range else None),
        "order": str(cpr.order),
        "fitted_on": json.dumps([list(p) for p in cpr.fitted_on]),
    }
    return _write(path, {"coefficients": torch.from_numpy(cpr.coefficients.copy())}, meta)


def load_cpr(
    path: str | os.PathLike, model: str | None = None, scheduler_key: Mapping[str, Any] | None = None
) -> CPRModel:
    """Read CPR coefficients; with ``model``/``scheduler_key`` given, check they match the file's. A malformed file
    is a ``ValueError`` naming it."""
    if model is not None:
        model = _check_model(model)
    wanted = _check_key(scheduler_key) if scheduler_key is not None else None
    tensors, meta = _read(path, CPR_FORMAT)
    stored_model, stored_key, cpr = _with_path(path, "DC-Solver CPR file", lambda: _parse_cpr(tensors, meta))
    if model is not None and stored_model != model:
        raise ValueError(f"{path} holds CPR coefficients for model {stored_model!r}, not {model!r}")
    if wanted is not None:
        _compare_key(stored_key, wanted, Path(path))
    return cpr


def _range_field(meta: Mapping[str, str], name: str, integer: bool) -> tuple[float, float] | None:
    value = _json_field(meta, name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        or value[0] > value[1]
    ):
        what = "integers" if integer else "finite numbers"
        raise ValueError(f"metadata field {name!r} must be null or [low, high] with low <= high ({what}), "
                         f"got {value!r:.80}")
    return (value[0], value[1])


def _parse_cpr(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[str, dict, CPRModel]:
    model = _model_field(meta)
    key = _object_field(meta, "scheduler")
    if "coefficients" not in tensors:
        raise ValueError(f"the tensor 'coefficients' is missing (the file holds {sorted(tensors)})")
    coefficients = stored_float64("coefficients", tensors["coefficients"])
    if coefficients.size != 36:
        raise ValueError(f"tensor 'coefficients' must hold 36 numbers (C[k,p,q], 4x3x3), got shape "
                         f"{tuple(coefficients.shape)}")
    order_text = _field(meta, "order")
    if not order_text.isdigit() or not 1 <= int(order_text) <= 3:
        raise ValueError(f"metadata field 'order' must be an integer in [1, 3] (the DC order), got {order_text!r}")
    fitted_on = _json_field(meta, "fitted_on")
    if not isinstance(fitted_on, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
        for p in fitted_on
    ):
        raise ValueError(f"metadata field 'fitted_on' must be a JSON list of [nfe, guidance_scale] pairs, "
                         f"got {fitted_on!r:.80}")
    cpr = CPRModel(
        coefficients,
        _range_field(meta, "nfe_range", integer=True),
        _range_field(meta, "guidance_range", integer=False),
        int(order_text),
        [tuple(p) for p in fitted_on],
    )
    return model, key, cpr
