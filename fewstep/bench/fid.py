"""Frechet distance for any image generator: feature extractors and cached reference statistics.

A :class:`FeatureExtractor` maps images in [0, 1] (NCHW) to ``[N, D]`` features and carries an ``id`` that
names it in cache keys: pytorch-fid's Inception-V3 with the user's weights file (:func:`inception_extractor`,
the FID convention) or any callable (a small network in tests, another backbone).

Reference statistics (mean and covariance of the reference features) come from a folder of reference images
(:func:`folder_statistics`: every ``.png``/``.jpg``/... directly inside it, one size, the size of the generated
images) or from any other image set, such as the many-step reference samples of the benchmark runner
(:func:`cached_statistics`). Both are cached as safetensors keyed by (extractor id, hash of the image set, image
size).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._checks import check_int
from ._cache import cache_name, load_statistics, save_cached
from .metrics import feature_statistics

__all__ = [
    "IMAGE_EXTENSIONS",
    "FeatureExtractor",
    "inception_extractor",
    "list_reference_images",
    "image_set_digest",
    "folder_statistics",
    "cached_statistics",
]

#: image files a reference folder may hold (pytorch-fid's list)
IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class FeatureExtractor:
    """``fn``: RGB images in [0, 1] (``[B, 3, H, W]``, float32) -> ``[B, D]`` features; ``id``: a stable name of the
    network and its weights (part of every cache key and of the results' configuration); ``batch_size``: images
    per call of ``fn``. Grayscale images (1 channel, the digits) are repeated over RGB before ``fn`` sees them."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    id: str
    batch_size: int = 50

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"`fn` must be callable (images -> [N, D] features), got {type(self.fn).__name__}")
        if not isinstance(self.id, str) or not self.id.strip():
            raise ValueError(f"`id` must be a non-empty string naming the extractor, got {self.id!r}")
        # a numpy integer is accepted and stored as int (the dataclass is frozen)
        object.__setattr__(self, "batch_size", check_int("batch_size", self.batch_size, 1))

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` features (float64, CPU) of ``[N, C, H, W]`` images in [0, 1], ``C`` 1 or 3."""
        if not isinstance(images01, torch.Tensor) or images01.ndim != 4 or images01.shape[1] not in (1, 3):
            raise ValueError(f"`images01` must be an NCHW tensor with 1 or 3 channels, got "
                             f"{getattr(images01, 'shape', images01)!r}")
        if images01.shape[1] == 1:
            images01 = images01.expand(-1, 3, -1, -1)
        out = []
        for chunk in images01.split(self.batch_size):
            feats = self.fn(chunk.to(torch.float32))
            if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or feats.shape[0] != len(chunk):
                raise ValueError(f"feature extractor {self.id!r} returned {getattr(feats, 'shape', type(feats))} for "
                                 f"{len(chunk)} images; it must return [N, D] features")
            out.append(feats.detach().to("cpu", torch.float64))
        return torch.cat(out)


def inception_extractor(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                        batch_size: int = 50) -> FeatureExtractor:
    """pytorch-fid's Inception-V3 pool features (2048-d) from the user's weights file (see
    :func:`fewstep.bench.inception.find_inception_weights`: ``FileNotFoundError`` saying how to supply it)."""
    from .inception import find_inception_weights, load_inception

    file = find_inception_weights(weights)
    model = load_inception(file, device)

    def features(images01: torch.Tensor) -> torch.Tensor:
        return model(images01.to(device))

    return FeatureExtractor(features, f"inception:{_file_digest(file)}", batch_size)


def _file_digest(file: Path) -> str:
    """Content hash of a weights file: the extractor id keys the reference-statistics cache, so two checkpoints
    of one name and size must not share it."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def list_reference_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder`` (sorted by name); ``ValueError`` for a missing folder or one
    with fewer than two images."""
    root = Path(folder)
    allowed = ", ".join(IMAGE_EXTENSIONS)
    if not root.is_dir():
        raise ValueError(f"`reference_images` {str(folder)!r} is not a directory; give a folder of reference "
                         f"images ({allowed})")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(files) < 2:
        raise ValueError(f"`reference_images` {str(folder)!r} holds {len(files)} image file(s); the Frechet distance "
                         f"needs at least 2 ({allowed}, directly inside the folder)")
    return files


def image_set_digest(files: Sequence[Path]) -> str:
    """Hash of the files' names and bytes: a changed, added or removed image gives another digest."""
    h = hashlib.sha256()
    for file in files:
        h.update(file.name.encode() + b"\0")
        h.update(hashlib.sha256(file.read_bytes()).digest())
    return h.hexdigest()[:16]


def _image_size(file: Path) -> tuple[int, int]:
    """``(height, width)`` from the file header (no decoding)."""
    from PIL import Image

    try:
        with Image.open(file) as image:
            width, height = image.size
    except Exception as exc:  # noqa: BLE001 -- any unreadable file gets the same clear message
        raise ValueError(f"`reference_images`: {str(file)!r} is not a readable image ({exc})") from None
    return height, width


def _check_size(size: object) -> tuple[int, int] | None:
    """``None`` or ``size`` as a ``(height, width)`` pair of ints >= 1 (a tuple, list or ``torch.Size``)."""
    if size is None:
        return None
    allowed = "None or a (height, width) pair of integers >= 1, e.g. (8, 8)"
    if isinstance(size, (str, bytes)) or not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2:
        raise ValueError(f"`size` must be {allowed}; got {size!r}")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v >= 1 for v in size):
        raise ValueError(f"`size` must be {allowed}; got {size!r}")
    return int(size[0]), int(size[1])


def _check_sizes(files: Sequence[Path], size: tuple[int, int] | None) -> tuple[int, int]:
    """The one ``(height, width)`` of all ``files``; it must equal ``size`` when given."""
    sizes = {f: _image_size(f) for f in files}
    first = sizes[files[0]]
    other = next((f for f in files if sizes[f] != first), None)
    folder = str(files[0].parent)
    if other is not None:
        raise ValueError(f"`reference_images` {folder!r} mixes image sizes: {files[0].name} is "
                         f"{first[0]}x{first[1]}, {other.name} is {sizes[other][0]}x{sizes[other][1]} "
                         "(height x width); all reference images must have one size")
    if size is not None and tuple(size) != first:
        raise ValueError(f"`reference_images` {folder!r} holds {first[0]}x{first[1]} images but the generated images "
                         f"are {size[0]}x{size[1]} (height x width); give reference images of the generated size "
                         "(or generate at theirs with --image-size)")
    return first


def _load_batches(files: Sequence[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """``[B, 3, H, W]`` float tensors in [0, 1] (RGB) of consecutive files (see :func:`_rgb01`)."""
    from PIL import Image

    for start in range(0, len(files), batch_size):
        arrays = []
        for file in files[start:start + batch_size]:
            try:
                with Image.open(file) as image:
                    arrays.append(_rgb01(image, file))
            except OSError as exc:  # a truncated or corrupt file: its header read, its pixels do not
                raise ValueError(f"`reference_images`: {str(file)!r} is not a readable image ({exc})") from None
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


#: 32-bit float images (PIL mode ``F``) may leave [0, 1] by this much (rounding), no more
FLOAT_IMAGE_TOLERANCE = 1e-6


def _rgb01(image, file: str | os.PathLike = "<image>") -> np.ndarray:
    """``[H, W, 3]`` float32 in [0, 1] of a PIL image read from ``file`` (named in errors); greyscale repeated over
    RGB. PIL's RGB conversion is right for 8-bit modes only (it clips deeper data to white or black), so:

    * 16-bit greyscale (``I;16*``, and ``I``, PIL's mode of 16-bit data in some formats): ``value / 65535``;
      an ``I`` (32-bit integer) image with a value outside 0..65535 is refused (its scale is unknown);
    * 32-bit float (``F``, e.g. a float TIFF): values taken as intensities already in [0, 1] (the float image
      convention), unchanged; a value outside [0, 1] (beyond :data:`FLOAT_IMAGE_TOLERANCE`) or NaN is refused;
    * other modes (``L``, ``RGB``, ``RGBA``, ``P``, ...): PIL's RGB conversion, ``value / 255``."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(image, dtype=np.float64)
        if grey.min(initial=0) < 0 or grey.max(initial=0) > 65535:
            raise ValueError(f"`reference_images`: {str(file)!r} is a 32-bit integer image (PIL mode {mode}) with "
                             f"values in [{grey.min():.0f}, {grey.max():.0f}]; only 0..65535 (16-bit data, scaled "
                             "by 65535) is supported: save it as 8- or 16-bit")
        return np.repeat((grey / 65535.0).astype(np.float32)[..., None], 3, axis=2)
    if mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        finite, tol = bool(np.isfinite(grey).all()), FLOAT_IMAGE_TOLERANCE
        if not finite or grey.min(initial=0) < -tol or grey.max(initial=0) > 1 + tol:
            found = "NaN or Inf" if not finite else f"values in [{grey.min():.6g}, {grey.max():.6g}]"
            raise ValueError(f"`reference_images`: {str(file)!r} is a 32-bit float image (PIL mode F) with {found}; "
                             "float images must hold intensities in [0, 1]: rescale it or save it as 8- or 16-bit")
        return np.repeat(grey.clip(0, 1).astype(np.float32)[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def cached_statistics(key: dict, cache_dir: str | os.PathLike | None,
                       compute: Callable[[], torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the ``[N, D]`` features ``compute()`` returns, read from the cache file of ``key`` in
    ``cache_dir`` when it exists (``compute`` is then not called), else computed and written there."""
    path = Path(cache_dir) / cache_name("refstats", key) if cache_dir is not None else None
    cached = load_statistics(path, key)
    if cached is not None:
        return cached
    mean, cov = feature_statistics(compute())
    if path is not None:
        from .runner import is_main_process

        if is_main_process():
            save_cached(path, {"mean": torch.from_numpy(mean), "cov": torch.from_numpy(cov)}, key)
    return mean, cov


def folder_statistics(folder: str | os.PathLike, extractor: FeatureExtractor, size: tuple[int, int] | None = None,
                      cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference statistics of the images in ``folder`` (see :func:`list_reference_images`), all of one size,
    equal to ``size`` = ``(height, width)`` of the generated images when given.

    Cached in ``cache_dir`` keyed by (``extractor.id``, :func:`image_set_digest`, image size): a later call with
    the same images and extractor reads the file and decodes no image."""
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(f"`extractor` must be a FeatureExtractor, got {type(extractor).__name__}")
    size = _check_size(size)
    files = list_reference_images(folder)
    height, width = _check_sizes(files, size)
    key = {"kind": "reference-statistics", "extractor": extractor.id, "images": image_set_digest(files),
           "count": len(files), "size": [height, width]}

    def compute() -> torch.Tensor:
        return torch.cat([extractor(batch) for batch in _load_batches(files, extractor.batch_size)])

    return cached_statistics(key, cache_dir, compute)
