"""Inception-V3 pool features in the convention of pytorch-fid (the network FID is defined with).

The architecture is TensorFlow's 2015 Inception graph as ported by pytorch-fid: torchvision's Inception-V3
layout (1008 classes, no auxiliary head) whose ``Mixed_5*``, ``Mixed_6b-e`` and ``Mixed_7b`` average pools
exclude the padding and whose ``Mixed_7c`` pool is a max pool. Images in [0, 1] are resized bilinearly to
299 x 299 (``align_corners=False``), mapped to [-1, 1], and the 2048-d output of the final average pool is
the feature. Nothing is downloaded: the weights file (``pt_inception-2015-12-05-6726825d.pth``) must be
supplied by the user, see :func:`load_inception`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InceptionV3Features", "load_inception", "find_inception_weights", "WEIGHTS_NAME", "WEIGHTS_URL",
           "inception_features"]

#: the file name pytorch-fid downloads (and torch hub caches) and where it is published
WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
#: environment variable naming the weights file
WEIGHTS_ENV = "FEWSTEP_INCEPTION_WEIGHTS"


class _Conv(nn.Module):
    """Convolution without bias + batch norm (eps 1e-3) + ReLU; parameter names as in torchvision."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _BlockB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class _BlockC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _BlockD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _BlockE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pool),
        ], 1)


class InceptionV3Features(nn.Module):
    """Inception-V3 up to the 2048-d average pool, pytorch-fid's FID variant; input NCHW in [0, 1]
    (1 or 3 channels, any size: resized to 299 x 299)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _BlockA(192, 32)
        self.Mixed_5c = _BlockA(256, 64)
        self.Mixed_5d = _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, 128)
        self.Mixed_6c = _BlockC(768, 160)
        self.Mixed_6d = _BlockC(768, 160)
        self.Mixed_6e = _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, max_pool=False)
        self.Mixed_7c = _BlockE(2048, max_pool=True)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        if images01.ndim != 4 or images01.shape[1] not in (1, 3):
            raise ValueError(f"`images01` must be NCHW with 1 or 3 channels, got shape {tuple(images01.shape)}")
        x = images01.expand(-1, 3, -1, -1) if images01.shape[1] == 1 else images01
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file: ``path``, else ``$FEWSTEP_INCEPTION_WEIGHTS``, else torch hub's cache (where
    pytorch-fid stores its download). ``FileNotFoundError`` saying how to supply it when none exists."""
    candidates = []
    if path is not None:
        candidates.append(("given path", Path(path)))
    elif os.environ.get(WEIGHTS_ENV):
        candidates.append((f"${WEIGHTS_ENV}", Path(os.environ[WEIGHTS_ENV])))
    else:
        candidates.append(("torch hub cache", Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME))
    for _, candidate in candidates:
        if candidate.is_file():
            return candidate
    where = ", ".join(f"{label} {str(c)!r}" for label, c in candidates)
    raise FileNotFoundError(
        f"Inception-V3 FID weights not found ({where}); fewstep does not download them. Fetch {WEIGHTS_URL} on a "
        f"machine with internet access and pass the file with --inception-weights PATH (or set ${WEIGHTS_ENV}, or "
        f"put it in torch hub's cache as checkpoints/{WEIGHTS_NAME})"
    )


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> InceptionV3Features:
    """The feature network with pytorch-fid's weights (see :func:`find_inception_weights`), in eval mode.

    The classifier head (``fc.*``) of the file is not needed and ignored; any other missing or unexpected
    parameter is an error naming it."""
    file = find_inception_weights(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any unreadable file gets the same clear message
        # one line: torch's own text spans several and advises weights_only=False (unsafe for a file of unknown
        # origin), so only the error type is kept
        raise ValueError(f"`inception_weights` {str(file)!r} is not a PyTorch checkpoint of tensors (torch.load with "
                         f"weights_only=True failed: {type(exc).__name__}); give pytorch-fid's weights file "
                         f"{WEIGHTS_NAME}") from None
    if not isinstance(state, dict):
        raise ValueError(f"`inception_weights` {str(file)!r} holds a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))
             and not k.endswith("num_batches_tracked")}
    model = InceptionV3Features()
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"`inception_weights` {str(file)!r} is not pytorch-fid's Inception-V3: missing "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    return model.eval().to(device)


@torch.no_grad()
def inception_features(model: InceptionV3Features, images01: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """``[N, 2048]`` pool features of images in [0, 1] (NCHW), float64 on the CPU."""
    device = next(model.parameters()).device
    return torch.cat([model(chunk.to(device, torch.float32)).double().cpu() for chunk in images01.split(batch_size)])
