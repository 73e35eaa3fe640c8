"""Calibration sets: the denoiser's real inputs recorded along full-precision sampling trajectories.

Two ways to pick where along a trajectory of ``T`` sampler steps a sample is recorded. Steps are
counted by the *diffusion index* ``d`` (0 = the image end, ``T - 1`` = the first, noisiest step); the
sampler's loop counter is ``i = T - 1 - d``.

* ``ndtc`` -- PTQ4DM's normally distributed time-step calibration (Shang et al. 2023, Algorithm 1):
  for each calibration sample ``d ~ floor(Normal(mean * T, std * T))`` clamped to ``[0, T - 1]``,
  ``mean <= 0.5`` skewing the set toward the image end; a fresh ``x_T`` is denoised with the
  full-precision sampler down to step ``d`` and the network input there is kept. Defaults are the
  released NDTC script's ``mean = 0.4``, ``std = 0.4``. Unlike the released script, the draw is read
  as a diffusion index (not the loop counter, which mirrors it to ``T - 1 - d``), and the label kept
  is the timestep the sampler actually feeds the network (not the raw counter).
* ``uniform`` -- Q-Diffusion's time-step-aware calibration (Li et al. 2023, sec. 4.1): ``k`` steps
  evenly spaced over the trajectory, the same trajectories recorded at each of them.

What is stored is exactly what the sampler passes to the denoiser: the (scaled) sample, the
model-facing timestep, and the conditioning -- with classifier-free guidance both the conditional and
the null-class rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .._checks import check_int, check_number

__all__ = [
    "CALIBRATION_METHODS",
    "CalibrationSet",
    "ndtc_indices",
    "uniform_indices",
    "record_denoiser_inputs",
    "calibration_from_records",
    "build_calibration_set",
]

CALIBRATION_METHODS = ("ndtc", "uniform")
#: PTQ4DM NDTC script defaults (fractions of T)
NDTC_MEAN, NDTC_STD = 0.4, 0.4


@dataclass
class CalibrationSet:
    """Recorded denoiser inputs, one row per network input row.

    ``sample`` (N, C, H, W), ``timestep`` (N,) model-facing, ``class_labels`` (N,) or ``None``,
    ``encoder_hidden_states`` (N, L, D) or ``None``; ``diffusion_index`` (N,) where along the trajectory
    (0 = image end); ``settings`` how it was built (kept in the quantization metadata);
    ``added_cond_kwargs``: SDXL's extra UNet inputs (``text_embeds`` (N, D), ``time_ids`` (N, 6)) or ``None``.
    """

    sample: torch.Tensor
    timestep: torch.Tensor
    class_labels: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    diffusion_index: torch.Tensor | None = None
    settings: dict = field(default_factory=dict)
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.sample.shape[0])

    def __post_init__(self) -> None:
        if not isinstance(self.sample, torch.Tensor) or self.sample.dim() < 1:
            raise ValueError(f"CalibrationSet `sample` must be a tensor with one row per network input, got "
                             f"{type(self.sample).__name__}")  # fmt: skip
        n = self.sample.shape[0]
        if self.timestep is None:
            raise ValueError(f"CalibrationSet `timestep` must be a tensor with one row per network input ({n}), got "
                             "None (the model-facing timestep of each row)")  # fmt: skip
        if self.added_cond_kwargs is not None and not isinstance(self.added_cond_kwargs, dict):
            raise ValueError(f"CalibrationSet `added_cond_kwargs` must be a dict of tensors (SDXL: text_embeds, "
                             f"time_ids), got {type(self.added_cond_kwargs).__name__}")  # fmt: skip
        extra = {f"added_cond_kwargs[{k!r}]": v for k, v in (self.added_cond_kwargs or {}).items()}
        for name, value in [*((k, getattr(self, k)) for k in ("timestep", "class_labels", "encoder_hidden_states",
                                                               "diffusion_index")), *extra.items()]:
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                got = "a 0-d tensor" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"CalibrationSet `{name}` must be a tensor with one row per network input ({n}), "
                                 f"got {got}")  # fmt: skip
            if value.shape[0] != n:
                raise ValueError(f"CalibrationSet `{name}` has {value.shape[0]} rows, `sample` has {n}")

    def batches(self, batch_size: int):
        """Yield keyword dicts for the denoiser (``sample``, ``timestep``, conditioning)."""
        for start in range(0, len(self), batch_size):
            sl = slice(start, start + batch_size)
            kwargs = {"sample": self.sample[sl], "timestep": self.timestep[sl]}
            if self.class_labels is not None:
                kwargs["class_labels"] = self.class_labels[sl]
            if self.encoder_hidden_states is not None:
                kwargs["encoder_hidden_states"] = self.encoder_hidden_states[sl]
            if self.added_cond_kwargs is not None:
                kwargs["added_cond_kwargs"] = {k: v[sl] for k, v in self.added_cond_kwargs.items()}
            yield kwargs


def _check_steps(steps: int) -> None:
    check_int("steps", steps, 1, numpy_ok=False)


def ndtc_indices(num: int, steps: int, mean: float = NDTC_MEAN, std: float = NDTC_STD,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """PTQ4DM NDTC draws: diffusion indices ``clamp(floor(N(mean*T, std*T)), 0, T-1)`` (0 = image end).

    ``mean`` must be in ``[0, 0.5]`` (the paper's ``mu <= T/2``), ``std > 0``.
    """
    _check_steps(steps)
    check_int("num", num, 1, numpy_ok=False)
    if isinstance(mean, bool) or not (isinstance(mean, (int, float)) and 0 <= mean <= 0.5):
        raise ValueError(f"`mean` (fraction of the steps) must be in [0, 0.5] (NDTC: mu <= T/2), got {mean!r}")
    check_number("std", std, 0.0, low_open=True, what="fraction of the steps")
    draws = torch.randn(num, generator=generator, dtype=torch.float64) * (std * steps) + mean * steps
    return torch.floor(draws).clamp(0, steps - 1).long()


def uniform_indices(num_steps_kept: int, steps: int) -> torch.Tensor:
    """Q-Diffusion: ``num_steps_kept`` diffusion indices evenly spaced over ``[0, T - 1]`` (every ``T / k``
    steps, starting at the image end)."""
    _check_steps(steps)
    if isinstance(num_steps_kept, bool) or not isinstance(num_steps_kept, int) or not 1 <= num_steps_kept <= steps:
        raise ValueError(f"`num_steps_kept` must be an integer in [1, {steps}] (the steps), got {num_steps_kept!r}")
    return torch.floor(torch.arange(num_steps_kept, dtype=torch.float64) * (steps / num_steps_kept)).long()


_INPUT_NAMES = ("sample", "timestep")


def progress_bar(iterable=None, **kwargs):
    """``tqdm`` when it is installed (it comes with diffusers), else a silent stand-in: quant needs only torch."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        class _Silent:
            def __init__(self, iterable=None, **_):
                self.iterable = iterable

            def __iter__(self):
                return iter(self.iterable)

            def update(self, n=1):
                pass

            def close(self):
                pass

        return _Silent(iterable)
    return tqdm(iterable, **kwargs)


def record_denoiser_inputs(
    denoiser: torch.nn.Module,
    run: Callable[[], object],
    steps: int,
    want: Callable[[int], torch.Tensor | None],
) -> list[dict]:
    """Run ``run()`` (one full-precision sampling run of ``steps`` denoiser calls) and record the inputs of
    the denoiser's calls. ``want(diffusion_index)`` returns the batch rows to keep at that step (or
    ``None``); with CFG the network batch is ``[cond rows; uncond rows]`` and both copies of a row are
    kept. Returns one dict per recorded call (tensors on the CPU, plus ``diffusion_index``)."""
    records: list[dict] = []
    calls = {"n": 0}

    def hook(module, args, kwargs):
        i = calls["n"]
        calls["n"] += 1
        d = steps - 1 - i  # loop counter -> diffusion index (the released NDTC code skips this mirror)
        rows = want(d) if 0 <= d < steps else None
        if rows is None or len(rows) == 0:
            return None
        named = dict(zip(_INPUT_NAMES, args))
        named.update({k: v for k, v in kwargs.items() if k in ("sample", "timestep", "class_labels",
                                                                "encoder_hidden_states")})
        sample = named["sample"]
        batch = sample.shape[0]
        rows = rows.to(torch.long)
        if batch % 2 == 0 and int(rows.max()) < batch // 2 and _is_cfg_batch(sample):
            rows = torch.cat([rows, rows + batch // 2])  # both CFG branches
        rec: dict = {"diffusion_index": torch.full((len(rows),), d, dtype=torch.long)}
        added = kwargs.get("added_cond_kwargs")
        if isinstance(added, dict) and added:  # SDXL: text_embeds, time_ids (one row per network input)
            rec["added_cond_kwargs"] = {k: v.detach()[rows.to(v.device)].cpu() for k, v in added.items()}
        for key, value in named.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            if value.dim() == 0 or value.shape[0] != batch:
                value = value.reshape(-1)[:1].expand(batch, *value.shape[1:]) if value.dim() <= 1 else value
            rec[key] = value.detach()[rows.to(value.device)].cpu()
        records.append(rec)
        return None

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    if calls["n"] != steps:
        raise ValueError(
            f"the sampling run called the denoiser {calls['n']} times, expected `steps`={steps} (one call per "
            "step; solvers with several evaluations per step are not supported for calibration)"
        )
    return records


def _is_cfg_batch(sample: torch.Tensor) -> bool:
    half = sample.shape[0] // 2
    return bool(torch.equal(sample[:half], sample[half:]))


def calibration_from_records(records: list[dict], settings: dict | None = None) -> CalibrationSet:
    """One ``CalibrationSet`` from the records of ``record_denoiser_inputs`` (e.g. of an SDXL or SD pipeline run:
    text embeddings and SDXL's ``added_cond_kwargs`` are kept); ``settings`` describe how they were drawn."""
    if not records:
        raise ValueError("the calibration set is empty: no denoiser call was recorded")

    def cat(key):
        values = [r[key] for r in records if key in r]
        return torch.cat(values) if len(values) == len(records) else None

    timestep = cat("timestep")
    added = None
    if all("added_cond_kwargs" in r for r in records):
        added = {k: torch.cat([r["added_cond_kwargs"][k] for r in records]) for k in records[0]["added_cond_kwargs"]}
    return CalibrationSet(cat("sample"), timestep, cat("class_labels"), cat("encoder_hidden_states"),
                          cat("diffusion_index"), dict(settings or {}), added)


def build_calibration_set(
    pipe,
    num_samples: int = 256,
    steps: int = 20,
    method: str = "ndtc",
    guidance_scale: float = 3.0,
    classes: Sequence[int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    ndtc_mean: float | None = None,
    ndtc_std: float | None = None,
    num_steps_kept: int | None = None,
    progress: bool = False,
) -> CalibrationSet:
    """Calibration set of a class-conditional pipeline (``ClassConditionalPipeline``) run with its own
    (full-precision) sampler for ``steps`` steps and CFG at ``guidance_scale``.

    ``ndtc``: ``num_samples`` trajectories, each recorded once at its NDTC draw. ``uniform``:
    ``num_steps_kept`` (default ``min(steps, 20)``) evenly spaced steps, ``ceil(num_samples / k)``
    trajectories recorded at each. Labels cycle through ``classes`` (default all). With guidance the
    set holds both CFG rows of every sample (``2 * num_samples`` network inputs, before the uniform
    rounding up). ``ndtc_mean`` / ``ndtc_std`` (default ``NDTC_MEAN`` / ``NDTC_STD``) apply to ``ndtc`` only
    and ``num_steps_kept`` to ``uniform`` only: given with the other method they are an error (as in
    ``fewstep quantize``), not ignored.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"`method` must be one of {list(CALIBRATION_METHODS)}, got {method!r}")
    # options of the other method are refused, not silently ignored
    for arg, value, applies in (("ndtc_mean", ndtc_mean, "ndtc"), ("ndtc_std", ndtc_std, "ndtc"),
                                ("num_steps_kept", num_steps_kept, "uniform")):
        if value is not None and method != applies:
            raise ValueError(f"`{arg}` applies to method={applies!r} only, not method={method!r}, got {value!r}")
    ndtc_mean = NDTC_MEAN if ndtc_mean is None else ndtc_mean
    ndtc_std = NDTC_STD if ndtc_std is None else ndtc_std
    check_int("num_samples", num_samples, 1, numpy_ok=False)
    check_int("batch_size", batch_size, 1, numpy_ok=False)
    seed = check_int("seed", seed, 0, 2**63 - 1)
    _check_steps(steps)
    for attr in ("unet", "num_classes"):
        if not hasattr(pipe, attr):
            raise ValueError(f"`pipe` must be a class-conditional pipeline (ClassConditionalPipeline, with .unet and "
                             f".num_classes), got a {type(pipe).__name__} without .{attr}")  # fmt: skip
    if classes is not None:
        given = classes.tolist() if hasattr(classes, "tolist") else classes  # a tensor / numpy array of labels
        given = list(given) if isinstance(given, Iterable) and not isinstance(given, (str, bytes, dict)) else []
        if not given:
            raise ValueError(f"`classes` must be a non-empty sequence of class labels in [0, {pipe.num_classes - 1}] "
                             f"(or None: all classes), got {classes!r}")  # fmt: skip
        classes = [check_int("classes", c, 0, pipe.num_classes - 1, what="each label") for c in given]
    generator = torch.Generator().manual_seed(seed)
    if method == "ndtc":
        targets = ndtc_indices(num_samples, steps, ndtc_mean, ndtc_std, generator)
        trajectories = num_samples
    else:
        kept = uniform_indices(min(steps, 20) if num_steps_kept is None else num_steps_kept, steps)
        trajectories = math.ceil(num_samples / len(kept))
    pool = list(classes) if classes is not None else list(range(pipe.num_classes))
    labels = [pool[i % len(pool)] for i in range(trajectories)]
    cfg = pipe.unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    records: list[dict] = []
    bar = progress_bar(total=trajectories, desc=f"calibration ({method})", disable=not progress, unit="traj")
    for start in range(0, trajectories, batch_size):
        n = min(batch_size, trajectories - start)
        noise = torch.randn((n, *shape), generator=generator)
        if method == "ndtc":
            local = targets[start:start + n]

            def want(d, local=local):
                return torch.nonzero(local == d).flatten()
        else:
            every = torch.arange(n)

            def want(d, every=every):
                return every if bool((kept == d).any()) else None

        def run(batch=labels[start:start + n], noise=noise):
            pipe(batch, num_inference_steps=steps, guidance_scale=guidance_scale, latents=noise, output_type="latent")

        records += record_denoiser_inputs(pipe.unet, run, steps, want)
        bar.update(n)
    bar.close()
    settings = {"method": method, "num_samples": num_samples, "steps": steps, "guidance_scale": guidance_scale,
                "seed": seed, "sampler": type(pipe.scheduler).__name__}
    if method == "ndtc":
        settings.update({"ndtc_mean": ndtc_mean, "ndtc_std": ndtc_std})
    else:
        settings["num_steps_kept"] = len(kept)
    return calibration_from_records(records, settings)
