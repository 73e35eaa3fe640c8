"""Measurement operators of linear inverse problems: ``y = A x + n``, shared by FlowChef and posterior samplers.

Each operator acts on NCHW images (the model's pixel range) and offers

* ``forward(x)`` / ``__call__`` -- ``A x`` (differentiable: costs backpropagate through it),
* ``adjoint(y)`` -- ``A^T y``, exact for the Euclidean inner product (``<A x, y> = <x, A^T y>``, tested),
* ``measure(x, generator)`` -- a seeded noisy measurement ``A x + noise_std * n`` (``n`` standard normal in the
  measurement space; for inpainting only on the observed pixels),
* ``output_shape(shape)`` and ``check_measurement(y, shape)`` -- shapes, with clear errors.

Operators (the FlowChef / DPS / STSL benchmark tasks, Patel et al. 2024 sec. 5; Chung et al. 2023 sec. 4;
Rout et al. 2024 sec. 5):
box inpainting and random-mask inpainting (``A = diag(m)``: the measurement keeps the image's shape with zeros
where nothing is observed, so ``A^T = A`` and ``||A x - y||^2`` is the masked loss), super-resolution by
``f x f`` average pooling (``A^T y`` spreads each low-resolution pixel as ``y / f^2`` over its block) or by
antialiased bicubic down-sampling (separable: ``A x = D x D^T`` per channel with a fixed ``[H/f, H]`` weight
matrix ``D``, so ``A^T y = D^T y D``), Gaussian deblurring and motion deblurring (per-channel convolution with a
normalised kernel -- a Gaussian, or a seeded straight motion streak --, zero padding; ``A^T`` is the transposed
convolution).

``backproject(y)`` is ``A^T y`` with the operator's gain removed (divided by ``A^T A 1`` where that is non-zero):
the image-space starting point of posterior samplers that initialise from the measurement (STSL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .._checks import check_int, check_number

__all__ = [
    "MeasurementOperator",
    "Inpainting",
    "BoxInpainting",
    "RandomInpainting",
    "SuperResolution",
    "GaussianBlur",
    "MotionBlur",
    "bicubic_weights",
    "OPERATORS",
    "make_operator",
]


def _check_noise(noise_std: float) -> float:
    return check_number("noise_std", noise_std, 0)


class MeasurementOperator:
    """Base class: a linear operator ``A`` on NCHW images plus additive Gaussian noise of std ``noise_std``."""

    name = "operator"

    def __init__(self, noise_std: float = 0.0):
        self.noise_std = _check_noise(noise_std)

    # shapes ---------------------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.name}: the image must be an NCHW tensor, got {got}")

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of ``A x`` for an image of ``shape``."""
        return tuple(shape)

    def check_measurement(self, y: torch.Tensor, image_shape: Sequence[int]) -> None:
        """``ValueError`` unless ``y`` has the shape ``A`` gives images of ``image_shape`` (batch may broadcast)."""
        want = self.output_shape(image_shape)
        if not isinstance(y, torch.Tensor) or y.ndim != len(want) or tuple(y.shape[1:]) != want[1:] \
                or y.shape[0] not in (1, want[0]):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(
                f"{self.name}: measurement shape {got} does not match the operator's output {want} for images of "
                f"shape {tuple(image_shape)}"
            )

    # the operator ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def backproject(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y / (A^T A 1)`` elementwise (0 where ``A^T A 1`` vanishes, e.g. unobserved pixels): ``A^T y``
        rescaled so that a constant image measured and back-projected stays that constant (interior)."""
        back = self.adjoint(y)
        gain = self.adjoint(self.forward(torch.ones_like(back)))
        safe = gain.abs() > 1e-8
        return torch.where(safe, back / torch.where(safe, gain, torch.ones_like(gain)), torch.zeros_like(back))

    def _noise_support(self, y: torch.Tensor) -> torch.Tensor | None:
        """Where the measurement has noise (``None``: everywhere)."""
        return None

    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``y = A x + noise_std * n``, ``n`` drawn from ``generator`` (on the image's device)."""
        y = self.forward(x)
        if self.noise_std > 0:
            n = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
            support = self._noise_support(y)
            y = y + self.noise_std * (n if support is None else n * support)
        return y

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, noise_std={self.noise_std})"


class Inpainting(MeasurementOperator):
    """``A x = m * x`` for a 0/1 mask ``m`` (``1`` = observed), shape ``[1 or N, 1 or C, H, W]``; ``A^T = A``."""

    name = "inpaint"

    def __init__(self, mask: torch.Tensor, noise_std: float = 0.0):
        super().__init__(noise_std)
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
            raise ValueError(f"`mask` must be a [N, C, H, W] tensor of 0/1, got {getattr(mask, 'shape', mask)!r}")
        if mask.is_complex():
            raise ValueError(f"`mask` must be a real (bool, integer or float) tensor of 0/1, got dtype {mask.dtype}")
        if not torch.all((mask == 0) | (mask == 1)):
            raise ValueError("`mask` must contain only 0 (missing) and 1 (observed)")
        self.mask = mask.float()

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        m = self.mask
        ok = x.shape[-2:] == m.shape[-2:] and m.shape[0] in (1, x.shape[0]) and m.shape[1] in (1, x.shape[1])
        if not ok:
            raise ValueError(f"{self.name}: image shape {tuple(x.shape)} does not fit the mask {tuple(m.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return x * self.mask.to(device=x.device, dtype=x.dtype)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.forward(y)

    def _noise_support(self, y: torch.Tensor) -> torch.Tensor:
        return self.mask.to(device=y.device, dtype=y.dtype)


class BoxInpainting(Inpainting):
    """A ``box x box`` square of missing pixels, centred unless ``top``/``left`` are given, in square images."""

    name = "box-inpaint"

    def __init__(self, size: int, box: int = 6, top: int | None = None, left: int | None = None,
                 noise_std: float = 0.0):
        size = check_int("size", size, 1)  # numpy integers are accepted and stored as int
        box = check_int("box", box, 1)
        if box >= size:
            raise ValueError(f"`box` must be smaller than the image size {size}, got {box}")
        top = (size - box) // 2 if top is None else top
        left = (size - box) // 2 if left is None else left
        top = check_int("top", top, 0, size - box)
        left = check_int("left", left, 0, size - box)
        mask = torch.ones(1, 1, size, size)
        mask[..., top:top + box, left:left + box] = 0
        super().__init__(mask, noise_std)
        self.box = (top, left, box)


class RandomInpainting(Inpainting):
    """A seeded random mask that drops a fraction ``drop`` of the pixels (the same mask for every image)."""

    name = "random-inpaint"

    def __init__(self, size: int, drop: float = 0.7, seed: int = 0, noise_std: float = 0.0):
        size = check_int("size", size, 1)
        drop = check_number("drop", drop, 0.0, 1.0, allowed="[0, 1)")
        if drop >= 1.0:
            raise ValueError(f"`drop` must be a finite number in [0, 1), got {drop!r}")
        g = torch.Generator().manual_seed(int(seed))
        mask = (torch.rand(1, 1, size, size, generator=g) >= drop).float()
        super().__init__(mask, noise_std)


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (``a = -0.5``: Matlab/PIL bicubic)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_weights(size: int, factor: int) -> torch.Tensor:
    """``[size // factor, size]`` weights of antialiased bicubic down-sampling by ``factor`` along one axis.

    Output pixel ``o`` (centre ``(o + 1/2) f - 1/2`` in input pixels) averages the inputs with the cubic kernel
    stretched by ``f`` (Matlab ``imresize``'s antialiasing); weights that fall outside the image are dropped
    and each row renormalised to sum to 1, so constant images stay constant.
    """
    if size % factor:
        raise ValueError(f"`size` {size} is not divisible by the factor {factor}")
    out = torch.arange(size // factor, dtype=torch.float64)
    centre = (out + 0.5) * factor - 0.5
    src = torch.arange(size, dtype=torch.float64)
    w = _cubic((src[None, :] - centre[:, None]) / factor)
    return w / w.sum(dim=1, keepdim=True)


class SuperResolution(MeasurementOperator):
    """``factor x factor`` down-sampling: ``mode="avgpool"`` (``A^T y`` = nearest upsampling divided by
    ``factor^2``) or ``mode="bicubic"`` (antialiased bicubic, ``A x = D x D^T``, ``A^T y = D^T y D``)."""

    name = "sr"
    MODES = ("avgpool", "bicubic")

    def __init__(self, factor: int = 2, noise_std: float = 0.0, mode: str = "avgpool"):
        super().__init__(noise_std)
        factor = check_int("factor", factor, 2)
        if mode not in self.MODES:
            raise ValueError(f"`mode` must be one of {list(self.MODES)}, got {mode!r}")
        self.factor = factor
        self.mode = mode
        if mode == "bicubic":
            self.name = "sr-bicubic"

    def check_input(self, x: torch.Tensor) -> None:
        super().check_input(x)
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(
                f"{self.name}: image size {tuple(x.shape[-2:])} is not divisible by the factor {self.factor}"
            )

    def output_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        n, c, h, w = shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"{self.name}: image size {(h, w)} is not divisible by the factor {self.factor}")
        return (n, c, h // self.factor, w // self.factor)

    def _matrices(self, h: int, w: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = bicubic_weights(h, self.factor).to(device=like.device, dtype=like.dtype)
        cols = bicubic_weights(w, self.factor).to(device=like.device, dtype=like.dtype)
        return rows, cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if self.mode == "bicubic":
            rows, cols = self._matrices(x.shape[-2], x.shape[-1], x)
            return rows @ x @ cols.T
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or y.ndim != 4:
            raise ValueError(f"{self.name}: the measurement must be an NCHW tensor, got {getattr(y, 'shape', y)!r}")
        f = self.factor
        if self.mode == "bicubic":
            rows, cols = self._matrices(y.shape[-2] * f, y.shape[-1] * f, y)
            return rows.T @ y @ cols
        return y.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1) / (f * f)

    def __repr__(self) -> str:
        return f"SuperResolution(factor={self.factor}, mode={self.mode!r}, noise_std={self.noise_std})"


class _Convolution(MeasurementOperator):
    """Per-channel convolution with ``self.kernel`` (``[k, k]``, odd ``k``, zero padding); ``A^T`` is the
    transposed convolution with the same weights."""

    kernel: torch.Tensor
    kernel_size: int

    def _weight(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        k = self.kernel.to(device=x.device, dtype=x.dtype)
        return k.expand(c, 1, self.kernel_size, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return F.conv2d(x, self._weight(x), padding=self.kernel_size // 2, groups=x.shape[1])

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        self.check_input(y)
        return F.conv_transpose2d(y, self._weight(y), padding=self.kernel_size // 2, groups=y.shape[1])


def _check_kernel_size(kernel_size: object) -> int:
    """``kernel_size`` as an int (numpy integers accepted): odd and >= 1."""
    if (isinstance(kernel_size, (bool, np.bool_)) or not isinstance(kernel_size, (int, np.integer))
            or kernel_size < 1 or kernel_size % 2 == 0):
        raise ValueError(f"`kernel_size` must be an odd integer >= 1, got {kernel_size!r}")
    return int(kernel_size)


class GaussianBlur(_Convolution):
    """Per-channel convolution with a normalised ``kernel_size`` Gaussian of std ``blur_sigma`` (zero padding)."""

    name = "deblur"

    def __init__(self, kernel_size: int = 5, blur_sigma: float = 1.0, noise_std: float = 0.0):
        super().__init__(noise_std)
        kernel_size = _check_kernel_size(kernel_size)
        blur_sigma = check_number("blur_sigma", blur_sigma, 0.0, low_open=True)
        r = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
        g = torch.exp(-0.5 * (r / blur_sigma) ** 2)
        k2 = torch.outer(g, g)
        self.kernel = (k2 / k2.sum()).float()
        self.kernel_size = kernel_size


class MotionBlur(_Convolution):
    """Per-channel convolution with a straight motion streak: a line of ``length`` pixels through the centre of a
    ``kernel_size`` kernel at ``angle`` degrees (seeded uniform angle when ``None``), rasterised by bilinear
    splatting of ``8 * length`` points and normalised to sum 1 (point-symmetric about the centre, but oriented)."""

    name = "motion-deblur"

    def __init__(self, kernel_size: int = 7, length: float | None = None, angle: float | None = None, seed: int = 0,
                 noise_std: float = 0.0):
        super().__init__(noise_std)
        kernel_size = _check_kernel_size(kernel_size)
        length = float(kernel_size) if length is None else length
        length = check_number("length", length, 1.0, kernel_size, allowed=f"[1, {kernel_size}] (the kernel size)")
        if angle is None:
            angle = float(torch.rand((), generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)) * 180
        angle = check_number("angle", angle, what="degrees")
        c = kernel_size // 2
        steps = torch.linspace(-0.5, 0.5, max(2, int(8 * length)), dtype=torch.float64) * (length - 1)
        theta = math.radians(angle)
        px, py = c + steps * math.cos(theta), c - steps * math.sin(theta)
        kernel = torch.zeros(kernel_size, kernel_size, dtype=torch.float64)
        x0, y0 = px.floor(), py.floor()
        for dx in (0, 1):
            for dy in (0, 1):
                w = (1 - (px - x0 - dx).abs()) * (1 - (py - y0 - dy).abs())
                xi, yi = (x0 + dx).long(), (y0 + dy).long()
                inside = (xi >= 0) & (xi < kernel_size) & (yi >= 0) & (yi < kernel_size)
                kernel.index_put_((yi[inside], xi[inside]), w[inside], accumulate=True)
        self.kernel = (kernel / kernel.sum()).float()
        self.kernel_size = kernel_size
        self.angle = float(angle)
        self.length = float(length)


#: task name -> operator class (``make_operator`` builds the default of each task for ``size x size`` images)
OPERATORS = {"inpaint": BoxInpainting, "random-inpaint": RandomInpainting, "sr": SuperResolution,
             "sr-bicubic": SuperResolution, "deblur": GaussianBlur, "motion-deblur": MotionBlur}


def make_operator(task: str, size: int, noise_std: float = 0.0, **kwargs) -> MeasurementOperator:
    """The operator of ``task`` (``inpaint``: centred 6x6 box at 16 px (scaled with ``size``), ``random-inpaint``:
    70% of pixels dropped, ``sr``: 2x average pooling, ``sr-bicubic``: 2x bicubic, ``deblur``: 5x5 Gaussian, std 1,
    ``motion-deblur``: a 7 px streak in a 7x7 kernel at a seeded angle)."""
    if task not in OPERATORS:
        raise ValueError(f"unknown measurement task {task!r}; available: {', '.join(OPERATORS)}")
    if task == "inpaint":
        kwargs.setdefault("box", max(1, round(size * 6 / 16)))
        return BoxInpainting(size, noise_std=noise_std, **kwargs)
    if task == "random-inpaint":
        return RandomInpainting(size, noise_std=noise_std, **kwargs)
    if task == "sr-bicubic":
        kwargs.setdefault("mode", "bicubic")
    return OPERATORS[task](noise_std=noise_std, **kwargs)
