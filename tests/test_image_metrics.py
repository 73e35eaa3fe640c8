"""PSNR/SSIM: closed-form cases, bad input, and parity with scikit-image where it is installed."""

from __future__ import annotations

import math

import pytest
import torch

from fewstep.bench.image_metrics import psnr, ssim


def _pair(seed=0, n=3, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g, dtype=torch.float64)
    return x, (x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)


def test_psnr_closed_form_and_ssim_of_identical_images():
    x = torch.zeros(2, 1, 8, 8)
    y = x + 0.1  # MSE 0.01 -> 20 dB
    torch.testing.assert_close(psnr(x, y), torch.full((2,), 20.0, dtype=torch.float64))
    assert math.isinf(psnr(x, x)[0].item())
    a, _ = _pair()
    torch.testing.assert_close(ssim(a, a), torch.ones(3, dtype=torch.float64))


def test_ssim_falls_with_noise():
    x, y1 = _pair(noise=0.05)
    _, y2 = _pair(noise=0.3)
    assert (ssim(x, y1) > ssim(x, y2)).all() and (ssim(x, y2) < 0.9).all()


def test_parity_with_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    x, y = _pair()
    for i in range(3):
        a, b = x[i, 0].numpy(), y[i, 0].numpy()
        assert ssim(x, y)[i].item() == pytest.approx(metrics.structural_similarity(a, b, data_range=1.0), abs=1e-10)
        assert psnr(x, y)[i].item() == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-10)


def test_bad_input():
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="must be NCHW tensors of one shape"):
        psnr(x, torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError, match="`data_range` must be a finite number > 0, got 0"):
        ssim(x, x, data_range=0)
    with pytest.raises(ValueError, match="`data_range` must be a finite number > 0, got inf"):
        psnr(x, x, data_range=float("inf"))
    with pytest.raises(ValueError, match="`data_range` must be a finite number > 0, got '1'"):
        psnr(x, x, data_range="1")
    with pytest.raises(ValueError, match="`y` contains NaN or Inf"):
        psnr(x, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match=r"empty images \(shape \(2, 0, 8, 8\)\)"):
        ssim(torch.zeros(2, 0, 8, 8), torch.zeros(2, 0, 8, 8))
    with pytest.raises(ValueError, match="`win_size` must be an odd integer >= 3, got 4"):
        ssim(x, x, win_size=4)
    with pytest.raises(ValueError, match="smaller than `win_size` 9"):
        ssim(x, x, win_size=9)
    with pytest.raises(TypeError, match="must be torch tensors"):
        psnr(x.numpy(), x)


def test_complex_images_are_refused():
    x = torch.zeros(1, 1, 8, 8, dtype=torch.complex64)
    for fn in (psnr, ssim):
        with pytest.raises(ValueError, match="`x` must be real images"):
            fn(x, x)


def test_integer_images_need_their_data_range():
    """Found by probing: uint8 images with the default data_range=1 scored -22 dB (and an SSIM of ~0) silently; they
    are out of range now, and with data_range=255 they score as the same images in [0, 1] do."""
    x = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    y = (x.long() + 3).clamp(max=255).to(torch.uint8)
    for fn in (psnr, ssim):
        with pytest.raises(ValueError, match=r"`x` must hold values in \[0, data_range\] = \[0, 1\]"):
            fn(x, y)
        torch.testing.assert_close(fn(x, y, data_range=255), fn(x.double() / 255, y.double() / 255))


def test_images_outside_the_data_range_are_refused():
    """Found by probing: model-space images in [-1, 1] were scored with data_range=1 without a word."""
    x, y = _pair()
    xm, ym = 2 * x - 1, 2 * y - 1
    for fn in (psnr, ssim):
        with pytest.raises(ValueError, match=r"`x` must hold values in \[0, data_range\] = \[0, 1\], got values in "
                                             r"\[-0\.9.*\]; rescale the images"):
            fn(xm, y)
        with pytest.raises(ValueError, match=r"`y` must hold values in \[0, data_range\] = \[0, 2\]"):
            fn(x, ym, data_range=2.0)
        with pytest.raises(ValueError, match=r"`y` must hold values in \[0, data_range\] = \[0, 0.5\]"):
            fn(x * 0.5, y, data_range=0.5)
    # rounding at the ends is tolerated; the scale of data_range is honoured
    torch.testing.assert_close(psnr(x + 1e-9, y - 1e-9 * y), psnr(x, y), rtol=1e-6, atol=0)
    torch.testing.assert_close(psnr(2 * x, 2 * y, data_range=2.0), psnr(x, y))
    torch.testing.assert_close(ssim(255 * x, 255 * y, data_range=255.0), ssim(x, y))
    assert psnr(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 8, 8)).shape == (0,)
