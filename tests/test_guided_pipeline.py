"""The class-conditional pipeline hosting guidance rules, and `fewstep generate --guidance`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

from fewstep import guidance, samplers
from fewstep.cli import main
from fewstep.pipelines import ClassConditionalPipeline

DDPM = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": False}


def _unet(num_class_embeds: int | None = 11) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=num_class_embeds,
    )  # fmt: skip


@pytest.fixture(scope="module")
def unet():
    return _unet()


FLOW = dict(FlowMatchEulerDiscreteScheduler(shift=1.0).config)


def _pipe(unet, sampler="unipc", config=DDPM):
    pipe = ClassConditionalPipeline(unet=unet, scheduler=samplers.get(sampler).from_config(config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents():
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("schedule", ["vp", "flow"])
@pytest.mark.parametrize("sampler", samplers.names("diffusion", standalone=True))
def test_every_rule_with_every_sampler(unet, sampler, schedule):
    pipe = _pipe(unet, sampler, DDPM if schedule == "vp" else FLOW)
    assert pipe.scheduler.is_flow == (schedule == "flow")
    outs = {}
    for name, scale in (("cfg", 4.0), ("cfg++", 0.8), ("apg", 4.0)):
        a, b = (
            pipe([3, 7], 4, guidance=name, guidance_scale=scale, latents=_latents(), output_type="latent").images
            for _ in range(2)
        )
        assert a.shape == (2, 1, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)
        outs[name] = a
    assert (outs["cfg"] - outs["cfg++"]).abs().max() > 1e-4 and (outs["cfg"] - outs["apg"]).abs().max() > 1e-4
    # CFG++ at 0 is unconditional sampling: the same as CFG at scale 0, exactly
    zero_pp = pipe([3, 7], 4, guidance="cfg++", guidance_scale=0.0, latents=_latents(), output_type="latent").images
    zero_cfg = pipe([3, 7], 4, guidance="cfg", guidance_scale=0.0, latents=_latents(), output_type="latent").images
    assert torch.equal(zero_pp, zero_cfg)


def test_default_is_cfg_and_rule_objects_are_hosted(unet):
    pipe = _pipe(unet)
    default = pipe([1, 2], 3, latents=_latents(), output_type="latent").images
    named = pipe([1, 2], 3, guidance="cfg", guidance_scale=3.0, latents=_latents(), output_type="latent").images
    assert torch.equal(default, named)
    rule = guidance.APG(guidance_scale=5.0, norm_threshold=2.0, momentum=-0.5)
    first = pipe([1, 2], 3, guidance=rule, latents=_latents(), output_type="latent").images
    second = pipe([1, 2], 3, guidance=rule, latents=_latents(), output_type="latent").images
    assert torch.equal(first, second)  # momentum reset per generation
    # a diffusers scheduler still runs plain CFG on the raw output
    pipe_d = ClassConditionalPipeline(unet=unet, scheduler=DDPMScheduler.from_config(DDPM))
    pipe_d.set_progress_bar_config(disable=True)
    assert pipe_d([1], 2, guidance_scale=2.0, output_type="np").images.shape == (1, 8, 8, 1)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"guidance": "cfg++", "guidance_scale": 1.5}, ValueError,
         r"`guidance_scale` must be a finite number in \[0, 1\] for CFG\+\+"),
        ({"guidance": "pag"}, ValueError, r"unknown guidance rule 'pag'; available: cfg, cfg\+\+, apg"),
        ({"guidance": guidance.CFG(2.0), "guidance_scale": 3.0}, ValueError, r"`guidance_scale`=3.0 given together"),
        ({"guidance": 3}, TypeError, r"`guidance` must be a rule name .* or a GuidanceRule, got int"),
        ({"guidance": "apg", "guidance_scale": -2.0}, ValueError, r"`guidance_scale` must be a finite number >= 0"),
    ],
)
def test_bad_guidance_arguments(unet, kwargs, error, match):
    with pytest.raises(error, match=match):
        _pipe(unet)([1], 2, **kwargs)


def test_guidance_needs_a_conditional_model_and_a_pair_scheduler(unet):
    uncond = ClassConditionalPipeline(unet=_unet(None), scheduler=samplers.get("ddim").from_config(DDPM))
    with pytest.raises(ValueError, match=r"this UNet is unconditional \(num_class_embeds=None\)"):
        uncond([1], 2, guidance="cfg++", guidance_scale=0.5)
    pipe = ClassConditionalPipeline(unet=unet, scheduler=DDPMScheduler.from_config(DDPM))
    with pytest.raises(ValueError, match=r"guidance 'apg' needs a fewstep scheduler .* got DDPMScheduler; use one of"):
        pipe([1], 2, guidance="apg")


def test_cli_generate_with_guidance(unet, tmp_path, capsys):
    model = tmp_path / "model"
    ClassConditionalPipeline(unet=unet, scheduler=DDPMScheduler.from_config(DDPM)).save_pretrained(model)
    out = tmp_path / "g.png"
    args = ["generate", "--model", str(model), "--steps", "3", "--num-images", "2", "--quiet", "--out", str(out)]
    assert main([*args, "--guidance", "cfgpp", "--guidance-scale", "0.5"]) == 0 and out.is_file()
    assert "x2 (cfg++)" in capsys.readouterr().out
    out.unlink()
    assert main([*args, "--guidance", "cfg++", "--guidance-scale", "2"]) == 2
    assert "`guidance_scale` must be a finite number in [0, 1] for CFG++" in capsys.readouterr().err
    code = main([*args, "--guidance", "pag"])  # a usage error: main returns 2 (argparse's too)
    assert code == 2 and not out.exists()


def test_from_pipe_quantized_and_compiled_denoiser(unet, tmp_path):
    from fewstep import quant

    pipe = _pipe(unet, "ddim")
    kw = dict(class_labels=[1, 2], num_inference_steps=3, latents=_latents(), output_type="latent")
    ref = pipe(**kw).images
    compiled = ClassConditionalPipeline.from_pipe(pipe, compile={"backend": "eager"})
    assert compiled.unet is pipe.unet and isinstance(compiled._denoiser, torch._dynamo.eval_frame.OptimizedModule)
    assert pipe._denoiser is None  # the base pipeline is left alone
    torch.testing.assert_close(compiled(**kw).images, ref, rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(2)
    cal = quant.CalibrationSet(sample=torch.randn(8, 1, 8, 8, generator=g), timestep=torch.linspace(950, 20, 8),
                               class_labels=torch.arange(8) % 11)  # fmt: skip
    quant.save_quantized(quant.quantize(unet, cal, quant.QuantConfig(act_grid=10, weight_grid=10)), tmp_path / "q")
    quantized = ClassConditionalPipeline.from_pipe(pipe, quantized=tmp_path / "q", quant_mode="fake")
    assert quant.quant_layers(quantized.unet) and not quant.quant_layers(pipe.unet)
    out = quantized(**kw).images
    assert torch.isfinite(out).all() and not torch.equal(out, ref) and (out - ref).abs().max() < 0.2 * ref.abs().max()
    auto = ClassConditionalPipeline.from_pipe(pipe, quantized=tmp_path / "q", quant_mode="auto")
    modes = {layer.mode for layer in quant.quant_layers(auto.unet).values()}
    assert "int8" in modes and modes <= {"int8", "fake"}  # the real int8 path wherever a layer has one
    torch.testing.assert_close(auto(**kw).images, out, rtol=0, atol=1e-3)  # int8 matches the fake-quant reference
    with pytest.raises(ValueError, match="`quantized` must be a directory written by .*: not a directory"):
        ClassConditionalPipeline.from_pipe(pipe, quantized=tmp_path / "none")
    with pytest.raises(ValueError, match=r"`compile` mode must be one of \['default'"):
        ClassConditionalPipeline.from_pipe(pipe, compile="turbo")


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
@pytest.mark.parametrize("scheduler", ["sde-dpmsolver++", "diffusers-ddpm"])
def test_stochastic_steps_draw_from_the_generator(unet, scheduler, guidance_scale):
    """SDE steps (fewstep's, guided through step_pair or not, and a diffusers scheduler whose step takes a
    generator) take their noise from the call's ``generator``: the same seed gives the same images whatever the
    global RNG did in between, another seed other images."""
    if scheduler == "diffusers-ddpm":
        pipe = ClassConditionalPipeline(unet=unet, scheduler=DDPMScheduler.from_config(DDPM))
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = ClassConditionalPipeline(
            unet=unet, scheduler=samplers.get("dpm-solver++").from_config(DDPM, algorithm_type=scheduler))
        pipe.set_progress_bar_config(disable=True)

    def run(seed: int, global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        return pipe([3, 7], 4, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                    output_type="latent").images

    first = run(0, 1)
    assert torch.equal(first, run(0, 2))
    assert (first - run(5, 1)).abs().max() > 1e-3


def test_generate_compile_and_cuda_graph_options(tmp_path, capsys):
    """``generate(compile=...)`` compiles the digits pipeline's denoiser (same images; eager backend here to keep
    it fast), ``cuda_graph`` is refused where FewstepPipeline does not host the model, and the CLI flags are
    refused with --task; ``from_pipe`` keeps the pipeline's dtype (diffusers' own would cast to float32)."""
    import fewstep
    from fewstep.pipelines.generate import generate

    pipe = fewstep.load_default("digits-eps", sampler="ddim")
    plain = generate(pipe, num_images=2, steps=3, progress=False)
    compiled = generate(pipe, num_images=2, steps=3, progress=False, compile={"backend": "eager"})
    np.testing.assert_allclose(compiled.images, plain.images, atol=1e-5)
    with pytest.raises(ValueError, match=r"cuda_graph=True needs the pipeline on a CUDA device, got cpu"):
        generate(pipe, num_images=2, steps=3, cuda_graph=True)  # hosted by FewstepPipeline; no GPU here
    with pytest.raises(ValueError, match="`cuda_graph` needs a pipeline FewstepPipeline hosts .* got MeanReverting"):
        generate(fewstep.load_default("digits-mr"), num_images=2, steps=3, cuda_graph=True)
    with pytest.raises(ValueError, match="`cuda_graph` must be True or False, got 'yes'"):
        generate(pipe, num_images=2, steps=3, cuda_graph="yes")
    half = fewstep.load_default("digits-eps", torch_dtype=torch.bfloat16)
    assert ClassConditionalPipeline.from_pipe(half).unet.dtype == torch.bfloat16
    out = tmp_path / "g.png"
    assert main(["generate", "--model", "digits-eps", "--cuda-graph", "--device", "cpu", "--out", str(out)]) == 2
    assert "--cuda-graph needs a CUDA GPU (--device auto or cuda), got --device cpu" in capsys.readouterr().err
    assert not out.exists()
    for flag in ("--compile", "--cuda-graph"):
        argv = ["generate", "--model", "digits-flow", "--task", "sr", flag, "--out", str(tmp_path / "x.png")]
        assert main(argv) == 2 and f"{flag} applies to plain sampling" in capsys.readouterr().err


def test_s3_schedule_with_implicit_correctors_under_cfgpp(unet):
    """An s3 schedule whose implicit correctors call the model twice at a time point runs in the pipeline with a
    pair rule (CFG++): one UNet call per CFG branch per NFE, and the same latents as the functional engine loop
    fed the CFG++ pair (guided x0, unconditional eps) at each call's grid point."""
    from fewstep.solvers.engine import StepDecision, sample_loop
    from fewstep.solvers.s3 import SolverSchedule

    decisions = [StepDecision("data", 1, corrector="implicit"), StepDecision("data", 2, corrector="implicit"),
                 StepDecision("noise", 2), StepDecision("data", 2, corrector="unic"), StepDecision("data", 1)]
    schedule = SolverSchedule([950.0, 700.0, 420.0, 200.0, 60.0], decisions)
    assert schedule.nfe == 7
    s3 = samplers.get("s3").from_config(DDPM, s3_schedule=schedule.to_dict())
    pipe = ClassConditionalPipeline(unet=unet, scheduler=s3)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    handle = unet.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        out = pipe([3, 7], 7, guidance="cfg++", guidance_scale=0.6, latents=_latents(), output_type="latent").images
    finally:
        handle.remove()
    assert sum(rows) == 7 * 4  # 7 NFE x (2 conditional + 2 unconditional rows)
    plan = pipe.scheduler.plan
    g = plan.grid
    labels, null = torch.tensor([3, 7]), torch.tensor([10, 10])

    def pair_fn(x, i):
        t = torch.tensor(int(g.timesteps[i]))
        with torch.no_grad():
            eps_c, eps_u = (unet(x, t, class_labels=c).sample for c in (labels, null))
        a, s = float(g.alphas[i]), float(g.sigmas[i])
        x0_c, x0_u = (x - s * eps_c) / a, (x - s * eps_u) / a
        return x0_u + 0.6 * (x0_c - x0_u), eps_u

    ref = sample_loop(pair_fn, _latents(), plan)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
