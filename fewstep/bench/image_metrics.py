"""Restoration metrics against a clean reference: PSNR and SSIM, per image, batched in torch.

SSIM follows Wang et al. (2004, eq. 13) with scikit-image's defaults (``structural_similarity``): a
uniform ``win_size x win_size`` window (7), ``K1 = 0.01``, ``K2 = 0.03``, sample (N - 1) covariances, and
the mean over the window positions that fit inside the image (its border crop).

Both take floating-point images with values in ``[0, data_range]`` (up to :data:`RANGE_TOLERANCE` of it):
integer images (uint8 with the default ``data_range=1`` scored -22 dB) and images in another range (model-space
[-1, 1]) are refused, since both metrics depend on the scale (PSNR) and the offset (SSIM's luminance term).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_number

__all__ = ["psnr", "ssim", "RANGE_TOLERANCE"]

#: images may leave [0, data_range] by this fraction of ``data_range`` (rounding), no more
RANGE_TOLERANCE = 1e-6


def _check_pair(x: torch.Tensor, y: torch.Tensor, data_range: float) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("`x` and `y` must be torch tensors (NCHW)")
    for name, t in (("x", x), ("y", y)):
        if t.is_complex():
            raise ValueError(f"`{name}` must be real images, got dtype {t.dtype}")
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"`x` and `y` must be NCHW tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1:].numel() == 0:
        raise ValueError(f"`x` and `y` hold empty images (shape {tuple(x.shape)}): need C, H, W >= 1")
    check_number("data_range", data_range, 0, low_open=True)
    tol = RANGE_TOLERANCE * data_range
    for name, t in (("x", x), ("y", y)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"`{name}` contains NaN or Inf")
        if t.numel() == 0:  # no images (N = 0): nothing to range-check
            continue
        low, high = float(t.min()), float(t.max())
        if low < -tol or high > data_range + tol:
            raise ValueError(f"`{name}` must hold values in [0, data_range] = [0, {data_range:g}], got values in "
                             f"[{low:.6g}, {high:.6g}]; rescale the images (model-space [-1, 1]: (x + 1) / 2 with "
                             "data_range=1) or pass their `data_range`")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """``PSNR = 10 log10(data_range^2 / MSE)`` per image (``[N]``), ``MSE = mean (x - y)^2`` over C, H, W; identical
    images give ``inf``. ``x``, ``y``: NCHW images in ``[0, data_range]`` (any real dtype: uint8 with
    ``data_range=255``)."""
    _check_pair(x, y, data_range)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 7) -> torch.Tensor:
    """Mean structural similarity per image (``[N]``, channels averaged):
    ``SSIM = (2 mu_x mu_y + c_1)(2 s_xy + c_2) / ((mu_x^2 + mu_y^2 + c_1)(s_x^2 + s_y^2 + c_2))`` over each
    ``win_size x win_size`` window, ``c_1 = (0.01 data_range)^2``, ``c_2 = (0.03 data_range)^2``. ``x``, ``y``:
    floating-point NCHW images in ``[0, data_range]``."""
    _check_pair(x, y, data_range)
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"`win_size` must be an odd integer >= 3, got {win_size!r}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"images of size {tuple(x.shape[-2:])} are smaller than `win_size` {win_size}")
    n, c = x.shape[:2]
    a = x.double().reshape(n * c, 1, *x.shape[-2:])
    b = y.double().reshape(n * c, 1, *y.shape[-2:])
    kernel = torch.full((1, 1, win_size, win_size), 1.0 / win_size**2, dtype=torch.float64, device=a.device)
    cov_norm = win_size**2 / (win_size**2 - 1)  # sample covariance

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)  # "valid": only windows inside the image

    ux, uy = mean(a), mean(b)
    vx = cov_norm * (mean(a * a) - ux * ux)
    vy = cov_norm * (mean(b * b) - uy * uy)
    vxy = cov_norm * (mean(a * b) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).reshape(n, c).mean(1)
