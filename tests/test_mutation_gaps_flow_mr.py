"""Mutation gaps in the SD3/Flux part of FewstepPipeline, the loop checks, the cached execution device and MRS.

Every reference is independent of the code under test: diffusers' own StableDiffusion3Pipeline / FluxPipeline
(same weights, same inputs), diffusers' ``calculate_shift`` and ``_pack_latents``, diffusers' own
``_execution_device``, numpy counts, and the paper's closed-form first-order MRS updates.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
from _helpers import FLUX_FLOW, SD3_FLOW
from diffusers import (
    AutoencoderKL,
    ConfigMixin,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    ModelMixin,
    StableDiffusion3Pipeline,
)
from diffusers.configuration_utils import register_to_config
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from test_fewstep_pipeline_flow import _sd3_transformer

from fewstep.pipelines import FewstepPipeline
from fewstep.pipelines.execution_device import ExecutionDevice

SIZE = 16  # image side (as tests/test_fewstep_pipeline_flow.py, whose tiny models these are)


def _vae(blocks: int = 1) -> AutoencoderKL:
    """A tiny VAE with non-trivial scaling and shift factors; ``blocks`` = 1 does not downsample, 2 halves."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8,) * blocks, layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=SIZE, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, shift_factor=0.1, scaling_factor=1.5,
    )  # fmt: skip


def _flux_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )  # fmt: skip


def _embeds() -> dict:
    g = torch.Generator().manual_seed(3)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    shapes = ((1, 6, 16), (1, 6, 16), (1, 8), (1, 8))
    return {name: torch.randn(*shape, generator=g) for name, shape in zip(names, shapes)}


def _pos(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if "negative" not in k}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sd3(scheduler, vae=None) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline(
        transformer=_sd3_transformer(), scheduler=scheduler, vae=vae or _vae(), text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_dev() -> FluxPipeline:
    torch.manual_seed(0)
    pipe = FluxPipeline(
        transformer=_flux_transformer(), scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOW),
        vae=_vae(), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------
# SD3 / Flux against diffusers' own pipelines
def test_sd3_with_dynamic_shifting_matches_the_stock_pipeline():
    """SD3 configs with ``use_dynamic_shifting`` take ``mu`` from the latent token count (latent side / patch size,
    squared) and, where the scheduler config has no ``max_shift`` (diffusers' DPMSolverMultistep with flow sigmas),
    SD3's own default 1.16 (Flux's is 1.15). All earlier SD3 tests used a static shift."""
    kw = _embeds()
    run = dict(height=SIZE, width=SIZE, num_inference_steps=3, output_type="np")
    # a fewstep flow-euler on a dynamically shifted FlowMatchEuler config: 2.8e-6 measured (float32 transformer)
    pipe = _sd3(FlowMatchEulerDiscreteScheduler.from_config({**SD3_FLOW, "use_dynamic_shifting": True}))
    fp = FewstepPipeline.from_pipe(pipe, scheduler="flow-euler", guidance="cfg", guidance_scale=5.0)
    ours = fp(**kw, generator=_gen(), **run).images
    theirs = pipe(**kw, guidance_scale=5.0, generator=_gen(), **run).images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    tokens = (SIZE // 2) ** 2  # 16x16 latents (VAE scale 1) in 2x2 patches
    ref = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ref.set_timesteps(3, mu=calculate_shift(tokens, 256, 4096, 0.5, 1.15))
    np.testing.assert_allclose(fp.scheduler.sigmas.numpy(), ref.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    # diffusers' own scheduler kept (its config lacks the seq-len keys): the very same arithmetic, measured equal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                          use_dynamic_shifting=True)  # fmt: skip
    assert "max_shift" not in dpm.config
    pipe = _sd3(dpm)
    fp = FewstepPipeline.from_pipe(pipe, guidance_scale=5.0)
    ours = fp(**kw, generator=_gen(), **run).images
    theirs = pipe(**kw, guidance_scale=5.0, generator=_gen(), **run).images
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = DPMSolverMultistepScheduler.from_config(dpm.config)
    ref.set_timesteps(3, mu=calculate_shift(tokens, 256, 4096, 0.5, 1.16))
    np.testing.assert_allclose(fp.pipe.scheduler.sigmas.numpy(), ref.sigmas.numpy(), rtol=1e-7, atol=0)


def test_default_height_is_the_sample_size_times_the_vae_scale():
    """height/width None: ``default_sample_size * vae_scale_factor`` as diffusers (the tiny VAE of the other tests
    has scale 1, which hid a dropped factor); a two-block VAE has scale 2: 32x32 images from 16x16 latents."""
    vae = _vae(2)
    pipe = _sd3(FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW), vae)
    assert pipe.vae_scale_factor == 2
    fp = FewstepPipeline.from_pipe(pipe, scheduler="flow-euler", guidance="cfg", guidance_scale=5.0)
    kw = {**_embeds(), "num_inference_steps": 2, "output_type": "np"}
    ours = fp(**kw, generator=_gen()).images
    theirs = pipe(**kw, guidance_scale=5.0, generator=_gen()).images
    assert ours.shape == theirs.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)  # 5.7e-6 measured


def test_flux_on_a_non_square_image_matches_the_stock_pipeline(flux_dev):
    """Height != width: Flux's packed latents (diffusers' ``_pack_latents``: (h/2)(w/2) tokens of 4 channels) and
    the unpacking on decode must keep the axes apart (every earlier test was square)."""
    h, w = 8, 24
    run = dict(height=h, width=w, num_inference_steps=3, output_type="np")
    kw = _pos(_embeds())
    theirs = flux_dev(**kw, guidance_scale=3.5, generator=_gen(), **run).images
    # ddim on a flow model is Euler too; its config says use_flow_sigmas=False, so it also gets Flux's sigmas
    for sampler in ("ddim", "flow-euler"):
        fp = FewstepPipeline.from_pipe(flux_dev, scheduler=sampler)
        ours = fp(**kw, generator=_gen(), **run).images
        assert ours.shape == (1, h, w, 3)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)  # 1.8e-6 measured
    packed = FluxPipeline._pack_latents(torch.randn(1, 4, h, w, generator=_gen(2)), 1, 4, h, w)
    assert packed.shape == (1, (h // 2) * (w // 2), 16)
    ours = fp(**kw, latents=packed, **run).images
    np.testing.assert_allclose(ours, flux_dev(**kw, latents=packed, guidance_scale=3.5, **run).images, atol=1e-5)
    # decode_flow_latents: diffusers' unpacking, then z / scaling + shift through the VAE
    z = packed.clone()
    vae = flux_dev.vae
    expected = vae.decode(FluxPipeline._unpack_latents(z, h, w, 1) / 1.5 + 0.1, return_dict=False)[0]
    with torch.no_grad():
        torch.testing.assert_close(fp.decode_flow_latents(z, h, w), expected.detach(), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# the cached execution device against diffusers' own answer
class _Net(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, buffers_only: bool = False):
        super().__init__()
        if buffers_only:
            self.register_buffer("w", torch.zeros(2))
        else:
            self.lin = torch.nn.Linear(2, 2)


class _Pipe(DiffusionPipeline):
    def __init__(self, net, other):
        super().__init__()
        self.register_modules(net=net, other=other)


@pytest.mark.parametrize("buffers_only", [False, True], ids=["parameters", "buffers-only"])
def test_execution_device_follows_a_moved_component(buffers_only):
    """A component moved with ``.to()`` (here to the meta device: the CPU machine's only other device) changes
    diffusers' answer; a module without parameters is located by its buffers, as diffusers does."""
    pipe = _Pipe(_Net(buffers_only), _Net(True))
    cached = ExecutionDevice()
    assert cached(pipe) == pipe._execution_device == torch.device("cpu")
    pipe.net.to("meta")
    assert pipe._execution_device == torch.device("meta")
    assert cached(pipe) == torch.device("meta")


def test_execution_device_follows_group_offloading():
    """diffusers answers a group-offloaded component's onload device (its ``_diffusers_hook`` registry). On a CPU
    machine the onload device can only be the CPU, so the hook's config is pointed at the meta device before the
    cache is asked again: the cache must notice the new hook and ask diffusers."""
    from diffusers.hooks import apply_group_offloading
    from diffusers.hooks.group_offloading import _get_top_level_group_offload_hook

    pipe = _Pipe(_Net(), _Net())
    cached = ExecutionDevice()
    assert cached(pipe) == torch.device("cpu")
    apply_group_offloading(pipe.net, onload_device=torch.device("cpu"), offload_type="block_level",
                           num_blocks_per_group=1)  # fmt: skip
    _get_top_level_group_offload_hook(pipe.net).config.onload_device = torch.device("meta")
    assert pipe._execution_device == torch.device("meta")
    assert cached(pipe) == torch.device("meta")


# ----------------------------------------------------------------------------------------------------
# MRS: the reduction to VP solvers, checked against diffusers' DPMSolverMultistepScheduler on z = (x - mu) / lam
LAM = 0.4


def _ir_sde_a(T: int, a_end: float) -> torch.Tensor:
    """IR-SDE's cosine a_t (released MR-Sampler/IR-SDE code, written out in torch): theta from the improved-DDPM
    cosine on T + 3 points with both ends dropped, dt normalised so that a_T = a_end."""
    s = 0.008
    x = torch.linspace(0, T + 2, T + 3, dtype=torch.float64) / (T + 2)
    abar_cos = torch.cos((x + s) / (1 + s) * math.pi / 2) ** 2
    theta = 1 - (abar_cos / abar_cos[0])[1:-1]
    cumsum = torch.cumsum(theta, 0)
    return torch.exp(cumsum * math.log(a_end) / cumsum[-1])


def test_mrs_schedule_follows_mr_a_end_and_num_train_timesteps():
    """A non-default ``mr_a_end`` (and a shorter grid) reaches the cosine schedule: every earlier test used 0.005."""
    from fewstep import samplers
    from fewstep.solvers.mean_reverting import mean_reverting_betas

    a = _ir_sde_a(50, 0.02)
    np.testing.assert_allclose(np.cumprod(1 - np.asarray(mean_reverting_betas(50, 0.02))), (a**2).numpy(), rtol=1e-12)
    sched = samplers.get("mrs")(stationary_std=LAM, mr_a_end=0.02, num_train_timesteps=51)
    # the scheduler keeps diffusers' float32 betas: their cumulative product is within 2e-7 (measured)
    np.testing.assert_allclose(sched.noise_schedule.alphas_cumprod, (a**2).numpy(), rtol=1e-6)
    assert math.sqrt(sched.noise_schedule.alphas_cumprod[-1]) == pytest.approx(0.02, rel=1e-6)


@pytest.mark.parametrize(
    "algorithm, solver_type, order, lower_order_final, final",
    [
        ("data", "heun", 3, False, "sigma_min"),  # the paper's ODE-3 (README: solver_type="heun")
        ("data", "midpoint", 2, False, "sigma_min"),
        ("data", "taylor", 2, True, "sigma_min"),  # taylor = heun at order 2 (the paper's ODE-2)
        ("noise", "heun", 2, True, "sigma_min"),
        ("noise", "heun", 3, False, "sigma_min"),
        ("data", "heun", 2, False, "zero"),  # a clean final step is first order whatever lower_order_final says
    ],
)
def test_mrs_in_x_is_diffusers_dpm_solver_in_z(algorithm, solver_type, order, lower_order_final, final):
    """MRS sec. 4: the MR-SDE is VP in z = (x - mu)/lam, so MRS's multistep ODE updates on x are diffusers'
    DPM-Solver(++) on z with the same levels and grid (6 steps: diffusers lowers the final order below 15 steps
    unless lower_order_final=False). Earlier tests compared MRS with fewstep's own dpm-solver++ only."""
    from _helpers import TinyDenoiser

    from fewstep import samplers

    options = dict(algorithm_type=algorithm, solver_type=solver_type, solver_order=order, final_sigmas_type=final)
    ours = samplers.get("mrs")(stationary_std=LAM, lower_order_final=lower_order_final, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = DPMSolverMultistepScheduler(
            num_train_timesteps=101, trained_betas=ours.config.trained_betas, solver_order=order,
            algorithm_type={"data": "dpmsolver++", "noise": "dpmsolver"}[algorithm],
            solver_type="heun" if solver_type == "taylor" else solver_type, lower_order_final=lower_order_final,
            final_sigmas_type=final,
        )  # fmt: skip
    model = TinyDenoiser(8)
    g = torch.Generator().manual_seed(0)
    mu = 0.3 * torch.randn(2, 8, generator=g, dtype=torch.float64)
    z = torch.randn(2, 8, generator=g, dtype=torch.float64)
    x = mu + LAM * z
    ours.set_timesteps(6)
    ref.set_timesteps(6)
    torch.testing.assert_close(ours.timesteps, ref.timesteps)
    for t in ours.timesteps:
        eps = model(z, t)
        x = ours.step(eps, t, x, mu=mu).prev_sample
        z = ref.step(eps, t, z).prev_sample
    # diffusers keeps its alpha/sigma tables in float32: measured <= 2e-7 of max|z| (~260, the a_T = 0.005 end)
    assert ((x - mu) / LAM - z).abs().max() / z.abs().max() < 2e-6


# ----------------------------------------------------------------------------------------------------
# loop checks
def test_raise_if_diverged_counts_the_images_with_any_nan_or_inf():
    """The count in the message is the number of images holding at least one NaN/Inf (numpy, batch first, NHWC
    as output_type='np' returns them; and a torch batch), counted here with numpy."""
    from fewstep.pipelines.loop_checks import raise_if_diverged

    images = np.zeros((3, 4, 5, 3), dtype=np.float32)
    raise_if_diverged(images)  # finite: nothing raised
    images[1, 0, 0, 0] = images[1, 3, 4, 2] = np.nan  # two far-apart values of one image: one image
    images[2, 0, 0, 2] = np.inf
    expected = int((~np.isfinite(images.reshape(3, -1))).any(axis=1).sum())
    assert expected == 2
    with pytest.raises(FloatingPointError, match=rf"^{expected} of 3 images hold NaN/Inf"):
        raise_if_diverged(images)
    batch = torch.zeros(4, 3, 2, 2)
    batch[3, 1, 1, 1] = -float("inf")
    with pytest.raises(FloatingPointError, match=r"^1 of 4 images hold NaN/Inf"):
        raise_if_diverged(batch)


def test_check_generators_refuses_a_shorter_list_too():
    """One generator per image, as diffusers: a list shorter than the batch is refused as well as a longer one
    (the pipeline tests passed longer lists only)."""
    from fewstep.pipelines.loop_checks import check_generators

    check_generators([_gen(0), _gen(1)], 2)
    check_generators(_gen(0), 5)  # a single generator serves the batch
    for n in (1, 3):
        with pytest.raises(ValueError, match=rf"`generator` is a list of {n} generators, but the batch has 2 "):
            check_generators([_gen(i) for i in range(n)], 2)


def test_check_returned_refuses_a_shrunk_batch_of_the_same_rank():
    """A callback's tensor must keep its whole shape (diffusers' CFG-cutoff callbacks halve the batch, same rank)."""
    from fewstep.pipelines.loop_checks import check_returned

    current = torch.zeros(2, 4, 8, 8)
    same = torch.ones(2, 4, 8, 8)
    assert check_returned("latents", same, current, 0) is same
    for bad in (torch.zeros(1, 4, 8, 8), torch.zeros(2, 4, 4, 8)):
        with pytest.raises(ValueError, match=rf"returned `latents` of shape {re.escape(str(tuple(bad.shape)))} at "
                                             r"step 3; the loop needs shape \(2, 4, 8, 8\)"):  # fmt: skip
            check_returned("latents", bad, current, 3)
