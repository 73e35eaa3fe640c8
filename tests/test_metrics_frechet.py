"""Frechet distance numerics: ``tr (C_1 C_2)^{1/2}`` against independent references (scipy's matrix square root,
closed forms through known eigenvalues and through the nuclear norm of centred features), for well- and
ill-conditioned covariances, fewer samples than features, and identical statistics (~0, never negative)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from fewstep.bench.metrics import feature_statistics, frechet_distance, frechet_distance_features


def _sqrtm_fd(m1, c1, m2, c2) -> float:
    """The classic pytorch-fid formula: ``tr sqrtm(C_1 C_2)`` by scipy's general matrix square root."""
    covmean = linalg.sqrtm(c1 @ c2)
    return float((m1 - m2) @ (m1 - m2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean.real))


def _nuclear_fd(f1: np.ndarray, f2: np.ndarray) -> float:
    """``tr (C_1 C_2)^{1/2} = ||A B^T||_* / sqrt((n - 1)(m - 1))`` for centred features ``A``, ``B`` (an SVD of the
    features, no covariance formed)."""
    a, b = f1 - f1.mean(0), f2 - f2.mean(0)
    n, m = len(f1), len(f2)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    d = f1.mean(0) - f2.mean(0)
    return float(d @ d + (a * a).sum() / (n - 1) + (b * b).sum() / (m - 1) - 2 * nuclear)


def _rotation(d: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


@pytest.mark.parametrize("d,n", [(8, 100), (64, 500)])
def test_full_rank_well_conditioned_agrees_with_scipy_sqrtm(d, n):
    """The documented agreement with ``scipy.linalg.sqrtm`` (~1e-14 relative) for full-rank covariances."""
    g = np.random.default_rng(d)
    for _ in range(3):
        f1 = g.normal(size=(n, d))
        f2 = g.normal(size=(n, d)) * g.uniform(0.5, 2.0, d) + 0.1
        stats = (*feature_statistics(f1), *feature_statistics(f2))
        assert frechet_distance(*stats) == pytest.approx(_sqrtm_fd(*stats), rel=1e-12)
        assert frechet_distance(*stats) == pytest.approx(_nuclear_fd(f1, f2), rel=1e-12)


@pytest.mark.parametrize("rotate", [False, True])
def test_ill_conditioned_covariances_match_their_known_eigenvalues(rotate):
    """Found by probing: eigenvalues of ``B^T C_2 B`` below ``D * eps * max`` (squared units) were dropped, so the
    small variances of ``diag(logspace(-6, 1, D))`` vanished from the cross term: identical statistics gave a
    positive distance (1.5e-3 at D = 2048) and distinct ones a biased one. For commuting covariances
    ``Q diag(a) Q^T`` and ``Q diag(b) Q^T`` the exact value is ``sum_k (sqrt a_k - sqrt b_k)^2``."""
    d = 256
    a = np.logspace(-6, 1, d)
    b = a * np.random.default_rng(1).uniform(0.9, 1.1, d)
    c1, c2 = np.diag(a), np.diag(b)
    if rotate:
        q = _rotation(d, 2)
        c1, c2 = q @ c1 @ q.T, q @ c2 @ q.T
        c1, c2 = (c1 + c1.T) / 2, (c2 + c2.T) / 2
    z = np.zeros(d)
    exact = float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(z, c1, z, c2) == pytest.approx(exact, rel=1e-9)
    same = frechet_distance(z, c1, z, c1)
    assert 0.0 <= same < 1e-11 * float(a.sum())


def test_ill_conditioned_features_match_the_nuclear_norm_form():
    """Features with variances spread over ten decades, more samples than features (full rank): the float64
    SVD of the centred features is the reference (scipy's sqrtm itself loses ~1e-2 absolute here)."""
    g = np.random.default_rng(0)
    scale = np.logspace(-4, 1, 128)
    f1 = g.normal(size=(600, 128)) * scale
    f2 = g.normal(size=(600, 128)) * scale * 1.05 + 0.01
    assert frechet_distance_features(f1, f2) == pytest.approx(_nuclear_fd(f1, f2), rel=1e-10)
    assert frechet_distance_features(f2, f1) == pytest.approx(_nuclear_fd(f1, f2), rel=1e-10)
    same = frechet_distance_features(f1, f1.copy())
    assert 0.0 <= same < 1e-12 * float((scale**2).sum())


@pytest.mark.parametrize("n,m", [(6, 6), (20, 500), (500, 20)])
def test_fewer_samples_than_features_is_exact_and_symmetric(n, m):
    """Singular covariances (rank ``n - 1`` and ``m - 1``, also of different rank): the nuclear-norm closed form,
    the same value in both argument orders."""
    g = np.random.default_rng(n + m)
    d = 64 if max(n, m) > 64 else 300
    f1, f2 = g.normal(size=(n, d)), g.normal(size=(m, d)) * 1.5 + 0.2
    exact = _nuclear_fd(f1, f2)
    assert frechet_distance_features(f1, f2) == pytest.approx(exact, rel=1e-9)
    assert frechet_distance_features(f2, f1) == pytest.approx(exact, rel=1e-9)


def test_identical_statistics_give_zero_never_negative():
    g = np.random.default_rng(3)
    for feats in (g.normal(size=(200, 64)), g.normal(size=(10, 64)), g.normal(size=(100, 64)) + 1e4,
                  g.normal(size=(1000, 32)) * np.logspace(-6, 3, 32), g.normal(size=(300, 16)).astype(np.float32)):
        mu, cov = feature_statistics(feats)
        value = frechet_distance(mu, cov, mu, cov)
        assert 0.0 <= value <= 1e-10 * max(float(np.trace(cov)), 1.0)


def test_zero_covariance_and_one_dimension():
    mu = np.array([1.0, 2.0])
    assert frechet_distance(mu, np.zeros((2, 2)), mu + 1, np.eye(2)) == pytest.approx(2.0 + 2.0)
    # D = 1: (sqrt(v1) - sqrt(v2))^2 + (m1 - m2)^2
    assert frechet_distance([0.0], [[4.0]], [1.0], [[9.0]]) == pytest.approx(1.0 + 1.0, rel=1e-14)
