"""The mean-reverting schedule and the restoration pipeline (tiny random UNet, save/load round trip)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from fewstep import samplers
from fewstep.pipelines import MeanRevertingPipeline, box_inpainting
from fewstep.solvers import VPSchedule
from fewstep.solvers.schedules import mean_reverting_alphas_cumprod


def test_ir_sde_cosine_schedule_endpoints_and_vp_form():
    abar = mean_reverting_alphas_cumprod(100, a_end=0.005)
    a = np.sqrt(abar)
    assert abar.shape == (101,) and np.all(np.diff(abar) < 0)
    assert a[-1] == pytest.approx(0.005) and a[0] == pytest.approx(0.99994, abs=2e-5)
    lam = 50 / 255  # IR-SDE's stationary std: lambda_t = log(a / (lam sqrt(1 - a^2))) spans ~ +6.11 .. -3.67
    schedule = VPSchedule(abar)
    assert schedule.lambda_(0) - np.log(lam) == pytest.approx(6.11, abs=0.01)
    assert schedule.lambda_(100) - np.log(lam) == pytest.approx(-3.67, abs=0.01)
    with pytest.raises(ValueError, match="`a_end` must be a finite number in"):
        mean_reverting_alphas_cumprod(100, a_end=1.5)


def test_ir_sde_cosine_schedule_matches_the_released_theta_grid():
    """Every level, not only the ends: the released MR-Sampler/IR-SDE code takes the cosine ``abar`` on ``T + 3``
    points of ``[0, 1]``, drops both ends for ``theta`` and normalises ``dt`` so that ``a_T = a_end`` (written out
    here independently, in torch)."""
    import math

    T, a_end, s = 100, 0.005, 0.008
    x = torch.linspace(0, T + 2, T + 3, dtype=torch.float64) / (T + 2)
    abar_cos = torch.cos((x + s) / (1 + s) * math.pi / 2) ** 2
    theta = 1 - (abar_cos / abar_cos[0])[1:-1]
    cumsum = torch.cumsum(theta, 0)
    a = torch.exp(cumsum * math.log(a_end) / cumsum[-1])
    np.testing.assert_allclose(np.sqrt(mean_reverting_alphas_cumprod(T, a_end)), a.numpy(), rtol=1e-12)


def test_box_inpainting_erases_one_square():
    x = torch.ones(3, 1, 16, 16)
    y = box_inpainting(x, box=6, generator=torch.Generator().manual_seed(0))
    assert ((y == -1).sum(dim=(1, 2, 3)) == 36).all()
    with pytest.raises(ValueError, match="must be a floating NCHW tensor"):
        box_inpainting(torch.ones(16, 16))
    for bad, got in ((torch.ones(3, 1, 16, 16, dtype=torch.int64), "a torch.int64 tensor"), (None, "NoneType")):
        with pytest.raises(ValueError, match=rf"`images` must be a floating NCHW tensor in \[-1, 1\] .* got {got}"):
            box_inpainting(bad)  # an integer image was "erased" to -1 in its own dtype; None was an AttributeError
    for box in (2.5, 0, 17):
        with pytest.raises(ValueError, match=rf"`box` must be an integer in \[1, 16\], got {box}"):
            box_inpainting(x, box=box)


@pytest.fixture(scope="module")
def tiny_mr(tmp_path_factory):
    abar = mean_reverting_alphas_cumprod(100)
    betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    scheduler = DDPMScheduler(num_train_timesteps=101, trained_betas=betas.tolist(), clip_sample=False,
                              timestep_spacing="trailing")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    path = tmp_path_factory.mktemp("tiny-mr")
    MeanRevertingPipeline(unet=unet, scheduler=scheduler, stationary_std=0.3).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", samplers.names("diffusion", standalone=True))
def test_restoration_pipeline_round_trip_and_determinism(tiny_mr, name):
    pipe = MeanRevertingPipeline.from_pretrained(tiny_mr)
    assert pipe.config.stationary_std == 0.3
    pipe.scheduler = samplers.get(name).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.timesteps is not None
    mu = torch.zeros(2, 1, 8, 8)
    a = pipe(mu, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    b = pipe(mu, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images
    assert a.shape == (2, 8, 8, 1) and np.array_equal(a, b)
    assert int(pipe.scheduler.timesteps[0]) == 100  # trailing spacing starts at the prior


def test_restoration_pipeline_bad_input(tiny_mr):
    pipe = MeanRevertingPipeline.from_pretrained(tiny_mr)
    with pytest.raises(ValueError, match=r"`measurement` must have shape \[N, 1, 8, 8\]"):
        pipe(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="`num_inference_steps` must be an integer >= 1"):
        pipe(torch.zeros(1, 1, 8, 8), num_inference_steps=0)
    with pytest.raises(ValueError, match="NCHW tensor"):
        pipe(np.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"`output_type` must be one of \['pil', 'np', 'pt', 'latent'\], got 'npy'"):
        pipe(torch.zeros(1, 1, 8, 8), output_type="npy")


@pytest.mark.parametrize("name", ["mrs", "unipc"])
def test_restoration_pipeline_reports_nan_with_the_step(tiny_mr, name):
    """A diverged run (here a UNet whose output overflows) is a FloatingPointError naming the step, as in the other
    fewstep pipelines; it returned NaN images silently. ``check_finite=False`` returns them."""
    pipe = MeanRevertingPipeline.from_pretrained(tiny_mr)
    pipe.set_progress_bar_config(disable=True)
    if name == "mrs":
        pipe.scheduler = samplers.from_config("mrs", pipe.scheduler.config, stationary_std=0.3)
    else:
        pipe.scheduler = samplers.get(name).from_config(pipe.scheduler.config)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"sampling produced NaN/Inf at step 0 of 3"):
        pipe(torch.zeros(1, 1, 8, 8), num_inference_steps=3)
    out = pipe(torch.zeros(1, 1, 8, 8), num_inference_steps=3, check_finite=False, output_type="pt").images
    assert not torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"`check_finite` must be True or False, got 1"):
        pipe(torch.zeros(1, 1, 8, 8), check_finite=1)


def test_restoration_pipeline_output_types_agree(tiny_mr):
    """`latent` is the restored sample in [-1, 1]; `pt`, `np` and `pil` are the same images in [0, 1]."""
    pipe = MeanRevertingPipeline.from_pretrained(tiny_mr)
    pipe.set_progress_bar_config(disable=True)
    mu = torch.linspace(-1, 1, 128).reshape(2, 1, 8, 8)
    out = {kind: pipe(mu, num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type=kind).images
           for kind in ("latent", "pt", "np", "pil")}
    unit = ((out["latent"].float() + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out["pt"], unit)
    np.testing.assert_allclose(out["np"], unit.permute(0, 2, 3, 1).numpy())
    assert len(out["pil"]) == 2 and out["pil"][0].size == (8, 8) and out["pil"][0].mode == "L"
    np.testing.assert_array_equal(np.asarray(out["pil"][1]), (out["np"][1, :, :, 0] * 255).round().astype(np.uint8))


def test_restoration_with_a_sigma_space_diffusers_scheduler_follows_the_diffusers_loop(tiny_mr):
    """A scheduler working in sigma space (Euler) gets its start scaled by init_noise_sigma and the model input by
    scale_model_input, as in diffusers' loops, on the VP process of z = (x - mu) / lam (both were skipped: 5.7 dB
    restorations on digits-mr)."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.utils.torch_utils import randn_tensor

    pipe = MeanRevertingPipeline.from_pretrained(tiny_mr)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    mu = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got = pipe(mu, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="latent").images
    lam, sched = 0.3, pipe.scheduler
    sched.set_timesteps(5)
    z = randn_tensor(mu.shape, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = mu + lam * sched.scale_model_input(z, t)
            eps = pipe.unet(torch.cat([x, mu], dim=1), t.reshape(1).expand(2)).sample
            z = sched.step(eps, t, z).prev_sample
    torch.testing.assert_close(got, mu + lam * z)
    with pytest.raises(ValueError, match="`measurement` contains NaN or Inf"):
        pipe(torch.full((1, 1, 8, 8), float("nan")), num_inference_steps=2)


# diffusers' DEIS calls np.log on a tensor (numpy 2 deprecates the __array_wrap__ that takes): diffusers' code
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
@pytest.mark.parametrize("name", ["UniPCMultistepScheduler", "DEISMultistepScheduler", "PNDMScheduler"])
def test_restoration_with_a_diffusers_scheduler_whose_step_takes_no_generator(tiny_mr, name):
    """diffusers' UniPC, DEIS and PNDM steps take no ``generator``: the loop passes it only where ``step`` accepts it
    (as diffusers' prepare_extra_step_kwargs does; it raised TypeError), and the result is the diffusers loop's."""
    import diffusers
    from diffusers.utils.torch_utils import randn_tensor

    pipe = MeanRevertingPipeline.from_pretrained(tiny_mr)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    mu = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    got = pipe(mu, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent").images
    lam, sched = 0.3, getattr(diffusers, name).from_config(pipe.scheduler.config)
    sched.set_timesteps(4)
    z = randn_tensor(mu.shape, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = mu + lam * sched.scale_model_input(z, t)
            z = sched.step(pipe.unet(torch.cat([x, mu], dim=1), t.reshape(1)).sample, t, z).prev_sample
    torch.testing.assert_close(got, mu + lam * z)
