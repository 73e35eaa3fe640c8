"""``digits-classifier``: a small CNN on the digits images -- logits for accuracy/guidance, features for FD."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = ["DigitsClassifier"]


class DigitsClassifier(ModelMixin, ConfigMixin):
    """Two conv stages (conv-GroupNorm-SiLU x2, then 2x2 pooling), global average pooling, a feature layer
    of ``feature_dim`` units and a linear head. Inputs are images in [-1, 1], ``[N, 1, R, R]``."""

    @register_to_config
    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (32, 64), feature_dim: int = 128,
                 num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in channels:
            layers += [
                nn.Conv2d(prev, ch, 3, padding=1), nn.GroupNorm(8, ch), nn.SiLU(),
                nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(8, ch), nn.SiLU(),
                nn.MaxPool2d(2),
            ]
            prev = ch
        self.body = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(prev, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, feature_dim]`` (the Frechet-distance embedding)."""
        h = self.body(images)
        return self.feature(h.mean(dim=(2, 3), keepdim=True))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, num_classes]``."""
        return self.head(self.features(images))
