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


def _symmetric(cov: np.ndarray, name: str) -> np.ndarray:
    """``cov`` symmetrized; ``ValueError`` when it is not symmetric up to rounding."""
    scale = max(float(np.abs(cov).max(initial=0.0)), 1e-300)
    if not np.allclose(cov, cov.T, rtol=1e-6, atol=1e-9 * scale):
        raise ValueError(f"`{name}` must be a symmetric covariance matrix")
    return (cov + cov.T) / 2


def _sqrt_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Square roots of the eigenvalues of a positive semi-definite matrix; those within rounding of 0 (below
    ``D * eps * max``, the rank tolerance of ``numpy.linalg.matrix_rank``) are 0, so the square root does not
    amplify rounding noise of a singular matrix (fewer samples than features)."""
    tol = w.size * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 0.0)
    return np.sqrt(np.where(w > tol, w, 0.0))


def _sqrt_psd(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix."""
    w, v = linalg.eigh(cov)
    return (v * _sqrt_eigenvalues(w)) @ v.T


def frechet_distance(mu1: Any, cov1: Any, mu2: Any, cov2: Any) -> float:
    """Frechet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``.

    ``tr (C_1 C_2)^{1/2}`` is the sum of the square roots of the eigenvalues of ``C_1^{1/2} C_2 C_1^{1/2}`` (the
    same eigenvalues as ``C_1 C_2``): two symmetric eigendecompositions by scipy, exact for singular covariances
    (fewer samples than features) and several times faster than a general matrix square root at D = 2048."""
    mu1, mu2 = _as_numpy(mu1, "mu1").reshape(-1), _as_numpy(mu2, "mu2").reshape(-1)
    cov1, cov2 = np.atleast_2d(_as_numpy(cov1, "cov1")), np.atleast_2d(_as_numpy(cov2, "cov2"))
    d = mu1.size
    if mu2.size != d or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, cov1 {cov1.shape}, cov2 {cov2.shape}; "
            "need means of length D and D x D covariances"
        )
    cov1, cov2 = _symmetric(cov1, "cov1"), _symmetric(cov2, "cov2")
    root1 = _sqrt_psd(cov1)
    inner = root1 @ cov2 @ root1
    trace_covmean = _sqrt_eigenvalues(linalg.eigvalsh((inner + inner.T) / 2)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_covmean
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
