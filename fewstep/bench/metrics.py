"""Sample-quality metrics: Frechet distance between Gaussians fitted to features, and RMSE.

Frechet distance (Dowson & Landau 1982; FID of Heusel et al. 2017):
``FD = |mu_1 - mu_2|^2 + tr(C_1 + C_2 - 2 (C_1 C_2)^{1/2})``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import linalg

__all__ = ["frechet_distance", "feature_statistics", "frechet_distance_features", "rmse"]


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` contains NaN or Inf")
    return arr


def frechet_distance(mu1: Any, cov1: Any, mu2: Any, cov2: Any) -> float:
    """Frechet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``; matrix square root by scipy."""
    mu1, mu2 = _as_numpy(mu1, "mu1").reshape(-1), _as_numpy(mu2, "mu2").reshape(-1)
    cov1, cov2 = np.atleast_2d(_as_numpy(cov1, "cov1")), np.atleast_2d(_as_numpy(cov2, "cov2"))
    d = mu1.size
    if mu2.size != d or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, cov1 {cov1.shape}, cov2 {cov2.shape}; "
            "need means of length D and D x D covariances"
        )
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.all(np.isfinite(covmean)):
        # Nearly singular product: regularize both covariances slightly (as pytorch-fid does).
        offset = np.eye(d) * 1e-6
        covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``[N, D]`` features, ``N >= 2``."""
    feats = _as_numpy(features, "features")
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"`features` must be [N, D] with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance_features(features_a: Any, features_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference over all elements."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.to(torch.float64) - b.to(torch.float64)).pow(2).mean().sqrt())
