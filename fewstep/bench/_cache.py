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

__all__ = ["cache_name", "load_cached", "save_cached", "cached_tensor"]


def cache_name(kind: str, key: dict[str, Any]) -> str:
    """``KIND-<digest of key>.safetensors``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{kind}-{digest}.safetensors"


def load_cached(path: Path, key: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The tensors of ``path``, or ``None`` when it does not exist; ``ValueError`` when it holds another key."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if json.loads(meta.get("key", "null")) != key:
            raise ValueError(f"cache file {str(path)!r} belongs to another configuration "
                             f"({meta.get('key')}); expected {json.dumps(key, sort_keys=True)}; delete it")
        return {k: f.get_tensor(k) for k in f.keys()}


def save_cached(path: Path, tensors: dict[str, torch.Tensor], key: dict[str, Any]) -> None:
    """Write ``tensors`` with ``key`` in the metadata, atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": json.dumps(key, sort_keys=True), "version": __version__}
    atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=meta))


def cached_tensor(cache_dir: Path | None, kind: str, key: dict[str, Any], name: str,
                  compute: Callable[[], torch.Tensor], write: bool = True) -> torch.Tensor:
    """The tensor ``name`` of the cache file for ``key`` under ``cache_dir``; computed by ``compute()`` and stored
    (when ``write``: the main process of a distributed run) on a miss. ``cache_dir=None`` always computes."""
    path = cache_dir / cache_name(kind, key) if cache_dir is not None else None
    cached = load_cached(path, key) if path is not None else None
    if cached is not None:
        return cached[name]
    value = compute()
    if path is not None and write:
        save_cached(path, {name: value}, key)
    return value
