#!/usr/bin/env python
"""Train the embedded default models on scikit-learn's digits and write them to ``fewstep/assets/``.

    python scripts/train_digits.py digits-eps        [--steps 3000] [--device cuda] [--out-root DIR]
    python scripts/train_digits.py digits-flow       [--steps 3000]
    python scripts/train_digits.py digits-mr         [--steps 3000]
    python scripts/train_digits.py digits-classifier [--epochs 40]

Seeded and reproducible for a given device. Diffusion models: class-conditional ``UNet2DModel`` (16x16,
channels 32/64/64, one ResNet block per level, 11 class embeddings = 10 digits + the null class used
for classifier-free guidance, label dropout 15%), AdamW with a cosine learning rate, EMA 0.999 of the
weights is what ships. ``digits-eps``: epsilon prediction on DDPM's linear schedule (1000 steps).
``digits-flow``: rectified-flow velocity ``v = eps - x0`` at ``x_s = (1 - s) x0 + s eps`` with logit-normal
``s`` (Esser et al. 2024), model time ``1000 s`` as in diffusers' flow-matching schedulers.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from tqdm.auto import tqdm

from fewstep.datasets import NUM_CLASSES, load_digits_images
from fewstep.pipelines.class_conditional import ClassConditionalPipeline
from fewstep.pipelines.classifier import DigitsClassifier
from fewstep.pipelines.mean_reverting import MeanRevertingPipeline, box_inpainting
from fewstep.solvers.schedules import mean_reverting_alphas_cumprod

ASSETS = Path(__file__).resolve().parent.parent / "fewstep" / "assets"
RESOLUTION = 16


def unet_config() -> dict:
    return dict(
        sample_size=RESOLUTION,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=NUM_CLASSES + 1,
    )


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background padding)."""
    n = images.shape[0]
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    size = images.shape[-1]
    return torch.stack([padded[i, :, dy[i]:dy[i] + size, dx[i]:dx[i] + size] for i in range(n)])


def _optimization(unet: torch.nn.Module, lr: float, steps: int, weight_decay: float = 0.0):
    """EMA copy, AdamW and a 200-step warm-up into cosine decay."""
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    return ema, opt, sched


def _train_step(loss: torch.Tensor, unet, ema, opt, sched, ema_decay: float = 0.999) -> None:
    """Backward, clip to norm 1, optimizer and lr step, EMA update."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    sched.step()
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), unet.parameters()):
            pe.lerp_(p, 1 - ema_decay)


def _recent_mean(losses: list[float]) -> float:
    """Mean of the last 500 losses (of all of them in a shorter run)."""
    recent = losses[-500:]
    return sum(recent) / len(recent)


def _log(kind: str, step: int, steps: int, losses: list[float], start: float) -> None:
    if (step + 1) % 500 == 0:
        print(f"{kind} step {step + 1}/{steps} loss {_recent_mean(losses):.4f} ({time.time() - start:.0f}s)",
              flush=True)


def train_diffusion(kind: str, steps: int, batch_size: int, lr: float, device: str, seed: int,
                    out_root: Path = ASSETS) -> Path:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits_images(RESOLUTION, "train")
    unet = UNet2DModel(**unet_config()).to(device)
    ema, opt, sched = _optimization(unet, lr, steps)
    if kind == "digits-eps":
        # "trailing" spacing starts every few-step grid at t = T - 1 (Lin et al. 2023)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                                  clip_sample=False, timestep_spacing="trailing")
        alphas_cumprod = scheduler.alphas_cumprod.to(device)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    losses = []
    start = time.time()
    for step in tqdm(range(steps), desc=kind, mininterval=10):
        idx = torch.randint(0, len(labels), (batch_size,), generator=g)
        x0 = random_shift(images[idx], g).to(device)
        y = labels[idx].clone()
        y[torch.rand(batch_size, generator=g) < 0.15] = NUM_CLASSES
        y = y.to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        if kind == "digits-eps":
            t = torch.randint(0, 1000, (batch_size,), generator=g).to(device)
            ac = alphas_cumprod[t].reshape(-1, 1, 1, 1)
            xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
            target = noise
        else:
            s = torch.sigmoid(torch.randn(batch_size, generator=g)).to(device)
            xt = (1 - s.reshape(-1, 1, 1, 1)) * x0 + s.reshape(-1, 1, 1, 1) * noise
            t = s * 1000
            target = noise - x0
        loss = (unet(xt, t, class_labels=y).sample - target).pow(2).mean()
        _train_step(loss, unet, ema, opt, sched)
        losses.append(loss.item())
        _log(kind, step, steps, losses, start)
    out = out_root / kind
    pipe = ClassConditionalPipeline(unet=ema.cpu(), scheduler=scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    recipe = {"model": kind, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "ema": 0.999,
              "label_dropout": 0.15, "resolution": RESOLUTION, "final_loss": _recent_mean(losses),
              "train_seconds": round(time.time() - start), "device": device}
    (out / "training.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return out


def train_mean_reverting(steps: int, batch_size: int, lr: float, device: str, seed: int,
                         stationary_std: float = 0.4, out_root: Path = ASSETS) -> Path:
    """``digits-mr``: IR-SDE box inpainting. ``z_t = a_t (x0 - mu)/lam + sqrt(1 - a_t^2) eps`` over 100 index
    steps; the UNet sees ``concat(mu + lam z_t, mu)`` and predicts ``eps``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, _ = load_digits_images(RESOLUTION, "train")
    abar = mean_reverting_alphas_cumprod(100)
    config = unet_config()
    config.update(in_channels=2, num_class_embeds=None)
    unet = UNet2DModel(**config).to(device)
    ema, opt, sched = _optimization(unet, lr, steps, weight_decay=0.01)  # AdamW's default, as shipped
    abar_t = torch.tensor(abar, dtype=torch.float32, device=device)
    betas = 1.0 - abar / torch.tensor(abar).roll(1).numpy()
    betas[0] = 1.0 - abar[0]
    scheduler = DDPMScheduler(num_train_timesteps=len(abar), trained_betas=betas.tolist(), prediction_type="epsilon",
                              clip_sample=False, timestep_spacing="trailing")
    losses, start = [], time.time()
    for step in tqdm(range(steps), desc="digits-mr", mininterval=10):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x0 = random_shift(images[idx], g)
        mu = box_inpainting(x0, generator=g)
        x0, mu = x0.to(device), mu.to(device)
        t = torch.randint(0, len(abar), (batch_size,), generator=g).to(device)
        a = abar_t[t].sqrt().reshape(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g).to(device)
        z = a * (x0 - mu) / stationary_std + (1 - a**2).sqrt() * noise
        loss = (unet(torch.cat([mu + stationary_std * z, mu], 1), t).sample - noise).pow(2).mean()
        _train_step(loss, unet, ema, opt, sched)
        losses.append(loss.item())
        _log("digits-mr", step, steps, losses, start)
    out = out_root / "digits-mr"
    MeanRevertingPipeline(unet=ema.cpu(), scheduler=scheduler, stationary_std=stationary_std).save_pretrained(
        out, safe_serialization=True)
    recipe = {"model": "digits-mr", "task": "box inpainting (6x6 square set to background)", "steps": steps,
              "batch_size": batch_size, "lr": lr, "seed": seed, "ema": 0.999, "stationary_std": stationary_std,
              "schedule": "IR-SDE cosine, 100 index steps, a_T = 0.005", "final_loss": _recent_mean(losses),
              "train_seconds": round(time.time() - start), "device": device}
    (out / "training.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return out


def train_classifier(epochs: int, batch_size: int, lr: float, device: str, seed: int,
                     out_root: Path = ASSETS) -> Path:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits_images(RESOLUTION, "train")
    test_images, test_labels = load_digits_images(RESOLUTION, "test")
    model = DigitsClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(labels), generator=g)
        for k in range(steps_per_epoch):
            idx = perm[k * batch_size:(k + 1) * batch_size]
            x = random_shift(images[idx], g).to(device)
            # light pixel noise so the features are not brittle on generated samples
            x = x + 0.05 * torch.randn(x.shape, generator=g).to(device)
            loss = torch.nn.functional.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(test_images.to(device)).argmax(1).cpu() == test_labels).float().mean().item()
        print(f"classifier epoch {epoch + 1}/{epochs} loss {loss.item():.4f} test accuracy {acc:.4f}", flush=True)
    out = out_root / "digits-classifier"
    model.cpu().save_pretrained(out, safe_serialization=True)
    recipe = {"model": "digits-classifier", "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "test_accuracy": acc, "resolution": RESOLUTION}
    (out / "training.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["digits-eps", "digits-flow", "digits-mr", "digits-classifier"],
                        help="which model to retrain (overwrites fewstep/assets/MODEL)")
    parser.add_argument("--steps", type=int, default=3000,
                        help="optimizer steps of the diffusion models (default 3000, as shipped)")
    parser.add_argument("--epochs", type=int, default=40, help="classifier epochs (default 40)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3; classifier 3e-3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and the weights (default 0)")
    parser.add_argument("--out-root", default=None, metavar="DIR",
                        help="write DIR/MODEL instead of overwriting the shipped fewstep/assets/MODEL "
                             "(e.g. for a trial run)")
    args = parser.parse_args()
    # the run overwrites a shipped model: refuse settings that would write a broken one
    for name in ("steps", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr is not None and not (args.lr > 0 and args.lr < float("inf")):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device; use cpu or cuda[:N]")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible to torch; use --device cpu")
    classifier = args.model == "digits-classifier"
    ignored = "--steps" if classifier and args.steps != 3000 else "--epochs" if not classifier and args.epochs != 40 \
        else None
    if ignored:
        parser.error(f"{ignored} does not apply to {args.model} (the classifier trains --epochs, the diffusion "
                     "models --steps)")
    root = ASSETS
    if args.out_root is not None:
        root = Path(args.out_root)
        if root.exists() and not root.is_dir():
            parser.error(f"--out-root {args.out_root!r} exists and is not a directory")
    if classifier:
        out = train_classifier(args.epochs, args.batch_size, args.lr or 3e-3, args.device, args.seed, root)
    elif args.model == "digits-mr":
        out = train_mean_reverting(args.steps, args.batch_size, args.lr or 2e-3, args.device, args.seed,
                                   out_root=root)
    else:
        out = train_diffusion(args.model, args.steps, args.batch_size, args.lr or 2e-3, args.device, args.seed,
                              root)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
