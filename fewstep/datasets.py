"""The handwritten digits of scikit-learn (1797 real 8x8 scans, 10 classes), ready for diffusion models.

Images are upsampled to ``resolution`` by bilinear interpolation and scaled to [-1, 1] with the data
set's own polarity (background 0 -> -1, full ink 16 -> +1: bright digits on black). A fixed, seeded
split holds out ``test_fraction`` of the images for metrics.
"""

from __future__ import annotations

import numpy as np
import torch

from ._checks import check_int, check_number

__all__ = ["NUM_CLASSES", "load_digits_images", "held_out_digits", "to_unit_range"]

NUM_CLASSES = 10
_SPLITS = ("train", "test", "all")


def load_digits_images(
    resolution: int = 16, split: str = "train", test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 1, R, R] float32 in [-1, 1], labels [N] int64)`` of the requested split."""
    from sklearn.datasets import load_digits

    if split not in _SPLITS:
        raise ValueError(f"`split` must be one of {list(_SPLITS)}, got {split!r}")
    check_int("resolution", resolution, 8, numpy_ok=False)
    check_number("test_fraction", test_fraction, 0.0, 1.0, low_open=True, allowed="(0, 1)")
    check_int("seed", seed, 0, 2**63 - 1)
    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(data.target.astype(np.int64))
    if resolution != 8:
        images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear",
                                                 align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).contiguous()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(labels)))
    if not 1 <= n_test < len(labels):
        raise ValueError(f"`test_fraction`={test_fraction!r} leaves {n_test} of {len(labels)} digits for the test "
                         "split and the rest for training: each split needs at least one")
    pick = {"test": order[:n_test], "train": order[n_test:], "all": order}[split]
    return images[pick], labels[pick]


def held_out_digits(num_images: int, size: int = 16, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_images`` held-out test digits (NCHW in [-1, 1]) and their labels, from index ``offset``."""
    check_int("size", size, 8, numpy_ok=False)
    images, labels = load_digits_images(size, "test")
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < images.shape[0]:
        raise ValueError(f"`offset` must be an integer in [0, {images.shape[0] - 1}] (index of the first held-out "
                         f"digit), got {offset!r}")
    available = images.shape[0] - offset
    if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= available:
        raise ValueError(f"`num_images` must be an integer in [1, {available}] (held-out digits), "
                         f"got {num_images!r}")
    return images[offset:offset + num_images], labels[offset:offset + num_images]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map model-space images in [-1, 1] to [0, 1] (clamped)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"`images` must be a torch.Tensor in [-1, 1], got {type(images).__name__}")
    return ((images + 1) / 2).clamp(0, 1)
