"""Quality of the embedded digits models: guidance alignment and Frechet distance in classifier features.

* accuracy -- share of samples the ``digits-classifier`` recognizes as the class they were asked for;
* FD -- Frechet distance between classifier features of generated samples and of the held-out real
  test digits; ``fd_floor`` is the FD between the real train and test splits (what a perfect model gets
  up to sampling noise).
Each sample's initial noise comes from its own seed (``seed + index``), so results do not depend on
the batch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..datasets import NUM_CLASSES, load_digits_images, to_unit_range
from .metrics import frechet_distance_features

__all__ = ["DigitsQuality", "evaluate_digits", "classifier_features", "per_sample_noise"]


@dataclass
class DigitsQuality:
    accuracy: float
    fd: float
    fd_floor: float
    num_samples: int
    steps: int
    nfe: int
    guidance_scale: float | None
    guidance: str = "cfg"
    #: saturation of the final samples (model space, data in [-1, 1]): mean |x| and share of pixels |x| > 1
    mean_abs: float | None = None
    clipped: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def per_sample_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per seed, stacked: batch-size independent noise."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def classifier_features(classifier, images01: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, logits)`` of images given in [0, 1] (NCHW)."""
    feats, logits = [], []
    for chunk in images01.split(batch_size):
        x = chunk.to(classifier.dtype) * 2 - 1
        f = classifier.features(x)
        feats.append(f)
        logits.append(classifier.head(f))
    return torch.cat(feats), torch.cat(logits)


@torch.no_grad()
def evaluate_digits(
    pipe,
    classifier,
    num_per_class: int = 100,
    steps: int = 20,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = True,
    guidance=None,
) -> DigitsQuality:
    """Generate ``num_per_class`` samples of every class and score them (see the module docstring).

    ``guidance``: a rule name (built with ``guidance_scale``, or the rule's default scale) or a
    ``fewstep.guidance`` rule object (leave ``guidance_scale`` unset); ``None`` is CFG, scale 3 by default.
    """
    from .. import guidance as guidance_rules

    if guidance is None:
        guidance, guidance_scale = "cfg", 3.0 if guidance_scale is None else guidance_scale
    rule = guidance_rules.make(guidance, guidance_scale)
    if num_per_class < 2 or steps < 1 or batch_size < 1:
        raise ValueError(
            f"need num_per_class >= 2, steps >= 1, batch_size >= 1; got {num_per_class}, {steps}, {batch_size}"
        )
    labels = [c for c in range(NUM_CLASSES) for _ in range(num_per_class)]
    cfg = pipe.unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    images, mean_abs, clipped = [], 0.0, 0.0
    for start in tqdm(range(0, len(labels), batch_size), desc="digits eval", disable=not progress):
        batch = labels[start:start + batch_size]
        noise = per_sample_noise(shape, [seed + start + k for k in range(len(batch))])
        out = pipe(
            batch, num_inference_steps=steps, guidance=rule, latents=noise,
            output_type="latent",
        )
        x = out.images.float().cpu()
        mean_abs += x.abs().mean(dim=(1, 2, 3)).sum().item()
        clipped += (x.abs() > 1).float().mean(dim=(1, 2, 3)).sum().item()
        images.append(to_unit_range(x))
    images = torch.cat(images)
    feats, logits = classifier_features(classifier, images)
    accuracy = (logits.argmax(1).cpu() == torch.tensor(labels)).float().mean().item()
    test_images, _ = load_digits_images(cfg.sample_size, "test")
    train_images, _ = load_digits_images(cfg.sample_size, "train")
    test_feats, _ = classifier_features(classifier, to_unit_range(test_images))
    train_feats, _ = classifier_features(classifier, to_unit_range(train_images))
    fd = frechet_distance_features(feats.cpu(), test_feats.cpu())
    floor = frechet_distance_features(train_feats.cpu(), test_feats.cpu())
    n, scale = len(labels), getattr(rule, "guidance_scale", None)
    return DigitsQuality(
        accuracy, fd, floor, n, steps, len(pipe.scheduler.timesteps), scale, rule.name, mean_abs / n, clipped / n
    )
