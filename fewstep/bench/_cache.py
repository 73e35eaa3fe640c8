"""Safetensors cache files of the benchmark (reference statistics, reference solves), keyed by a JSON dict.

The file name is a digest of the key; the key itself is stored in the file's metadata and checked on load, so
a file from another configuration is an error, never a silent hit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._io import atomic_write

__all__ = ["cache_name", "load_cached", "save_cached", "cached_tensor", "check_cached_rows", "check_cached_range",
           "load_statistics"]


def cache_name(kind: str, key: dict[str, Any]) -> str:
    """``KIND-<digest of key>.safetensors``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{kind}-{digest}.safetensors"


def load_cached(path: Path, key: dict[str, Any], names: tuple[str, ...] = ()) -> dict[str, torch.Tensor] | None:
    """The tensors of ``path``, or ``None`` when it does not exist; ``ValueError`` naming the file when it holds
    another key, cannot be read, lacks one of ``names`` or holds a non-float or non-finite tensor."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = json.loads(meta.get("key", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()} if stored == key else None
    except Exception as exc:  # truncated or foreign files: safetensors' and json's own error types
        raise ValueError(f"cache file {str(path)!r} is not readable ({exc}); delete it") from None
    if tensors is None:
        raise ValueError(f"cache file {str(path)!r} belongs to another configuration "
                         f"({meta.get('key')}); expected {json.dumps(key, sort_keys=True)}; delete it")
    for name in names:
        if name not in tensors:
            raise ValueError(f"cache file {str(path)!r} lacks the tensor {name!r}; delete it")
    for name, value in tensors.items():
        if value.dtype not in (torch.float32, torch.float64) or not bool(torch.isfinite(value).all()):
            raise ValueError(f"cache file {str(path)!r} holds a damaged tensor {name!r} ({value.dtype}, finite "
                             f"float32/float64 expected); delete it")
    return tensors


def check_cached_rows(path: Path | None, value: torch.Tensor, rows: int | None) -> torch.Tensor:
    """``value`` (read from ``path``) must have ``rows`` rows when given: a damaged file would broadcast."""
    if rows is not None and (value.ndim < 1 or value.shape[0] != rows):
        raise ValueError(f"cache file {str(path)!r} holds {tuple(value.shape)}, expected {rows} rows; delete it")
    return value


def save_cached(path: Path, tensors: dict[str, torch.Tensor], key: dict[str, Any]) -> None:
    """Write ``tensors`` with ``key`` in the metadata, atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": json.dumps(key, sort_keys=True), "version": __version__}
    atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=meta))


#: the value range of cached tensors by name: the bench stores images in [0, 1] as "images" (the digits objective's
#: samples, ``output_type="pt"``); "latents" (real pipelines' reference solves) are unbounded
_VALUE_RANGES: dict[str, tuple[float, float]] = {"images": (0.0, 1.0)}
#: slack of that range check (the images are clamped to [0, 1] before they are stored: exact up to float rounding)
_RANGE_TOL = 1e-6


def check_cached_range(path: Path | None, name: str, value: torch.Tensor,
                       value_range: tuple[float, float] | None) -> torch.Tensor:
    """``value`` (the tensor ``name`` read from ``path``) must lie in ``value_range`` when given (up to
    ``_RANGE_TOL``): a damaged file would otherwise be scored against silently (an MSE of 1e60)."""
    if value_range is None or value.numel() == 0:
        return value
    lo, hi = value_range
    vmin, vmax = float(value.min()), float(value.max())
    if vmin < lo - _RANGE_TOL or vmax > hi + _RANGE_TOL:
        raise ValueError(f"cache file {str(path)!r} holds {name!r} with values in [{vmin:.6g}, {vmax:.6g}], outside "
                         f"[{lo:g}, {hi:g}] where the bench stores them; delete it")
    return value


def cached_tensor(cache_dir: Path | None, kind: str, key: dict[str, Any], name: str,
                  compute: Callable[[], torch.Tensor], write: bool = True, rows: int | None = None) -> torch.Tensor:
    """The tensor ``name`` of the cache file for ``key`` under ``cache_dir``; computed by ``compute()`` and stored
    (when ``write``: the main process of a distributed run) on a miss. ``cache_dir=None`` always computes.
    ``rows``: the number of rows (samples) a stored tensor must have. A stored tensor's values must lie in its
    name's range (``_VALUE_RANGES``: ``[0, 1]`` for ``"images"``, none else)."""
    path = cache_dir / cache_name(kind, key) if cache_dir is not None else None
    cached = load_cached(path, key, (name,)) if path is not None else None
    if cached is not None:
        value = check_cached_rows(path, cached[name], rows)
        return check_cached_range(path, name, value, _VALUE_RANGES.get(name))
    value = compute()
    if path is not None and write:
        save_cached(path, {name: value}, key)
    return value


def load_statistics(path: Path | None, key: dict[str, Any]) -> tuple[Any, Any] | None:
    """Cached reference statistics ``(mean [D], cov [D, D])`` as numpy arrays, or ``None`` on a miss."""
    cached = load_cached(path, key, ("mean", "cov")) if path is not None else None
    if cached is None:
        return None
    mean, cov = cached["mean"], cached["cov"]
    if mean.ndim != 1 or tuple(cov.shape) != (mean.numel(), mean.numel()):
        raise ValueError(f"cache file {str(path)!r} holds statistics of shapes {tuple(mean.shape)} and "
                         f"{tuple(cov.shape)} (a mean [D] and a covariance [D, D] expected); delete it")
    from scipy import linalg

    from .metrics import _check_psd, _symmetric

    # the checks the Frechet distance applies to its statistics, here with the file's name (there they name an
    # argument, `cov2`): entries below ~1e150 (squares overflow float64 beyond), a symmetric PSD covariance
    scale = max(float(mean.abs().max()), float(cov.abs().max())) if mean.numel() else 0.0
    if scale > 1e150:
        raise ValueError(f"cache file {str(path)!r} holds statistics whose entries reach {scale:.3g} (the Frechet "
                         "distance needs them below ~1e150; features of that size are no real statistics); delete it")
    try:
        sym = _symmetric(cov.double().numpy(), "cov")
        _check_psd(linalg.eigvalsh(sym), "cov")
    except ValueError as exc:
        raise ValueError(f"cache file {str(path)!r} holds a damaged covariance: {exc}; delete it") from None
    return mean.numpy(), cov.numpy()
