"""FewstepPipeline's graph mode, quantized denoiser and torch.compile, on tiny random SD1.5-, SDXL-, SD3- and
Flux-shaped pipelines.

The static step that ``cuda_graph=True`` captures also runs uncaptured (``_loop_mode = "static"``): on the CPU it
must give the eager loop's latents bit for bit, for several solvers and every guidance rule, across repeated
calls (buffers reused, APG momentum reset). Real CUDA-graph capture runs only where CUDA is available.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _helpers import FLUX_FLOW, SD3_FLOW, SD15_PNDM, SDXL_EULER
from diffusers import (
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from test_fewstep_pipeline import _unet, _vae
from test_fewstep_pipeline_flow import _flux_transformer, _sd3_transformer
from test_fewstep_pipeline_flow import _vae as _flow_vae

from fewstep import guidance, quant, samplers
from fewstep.guidance.static import StaticGuidance
from fewstep.pipelines import FewstepPipeline
from fewstep.solvers.static import StaticEngine

CUDA = torch.cuda.is_available()
SIZE = 16
#: (sampler, config overrides): the graph-capable solvers at several orders
SOLVERS = [
    ("ddim", {}),
    ("dpm-solver++", {"solver_order": 2}),
    ("dpm-solver++", {"solver_order": 3}),
    ("unipc", {}),
]
RULES = [
    ("cfg", guidance.CFG(4.0)),
    ("cfg++", guidance.CFGPlusPlus(0.7)),
    ("apg", guidance.APG(4.0, norm_threshold=2.0, momentum=-0.5)),
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    return _quiet(StableDiffusionPipeline(
        vae=_vae(), text_encoder=None, tokenizer=None, unet=_unet(), scheduler=PNDMScheduler.from_config(SD15_PNDM),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ))  # fmt: skip


@pytest.fixture(scope="module")
def sdxl():
    torch.manual_seed(0)
    unet = _unet(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=56)
    return _quiet(StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_EULER), add_watermarker=False,
    ))  # fmt: skip


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    return _quiet(StableDiffusion3Pipeline(
        transformer=_sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW),
        vae=_flow_vae(4), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    ))  # fmt: skip


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    return _quiet(FluxPipeline(
        transformer=_flux_transformer(True), scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOW),
        vae=_flow_vae(4), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    ))  # fmt: skip


def _sd_embeds(n: int = 2, pooled: bool = False) -> dict:
    g = _gen(3)
    kw = {"prompt_embeds": torch.randn(n, 5, 16, generator=g),
          "negative_prompt_embeds": torch.randn(n, 5, 16, generator=g)}  # fmt: skip
    if pooled:
        kw.update(pooled_prompt_embeds=torch.randn(n, 8, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(n, 8, generator=g))  # fmt: skip
    return kw


def _flow_embeds(n: int = 2) -> dict:
    return _sd_embeds(n, pooled=True)


def _both(fp: FewstepPipeline, seeds=(1, 2), **kw) -> tuple[list, list]:
    """Latents of the eager loop and of the static step (twice each: the second static call reuses the buffers)."""
    fp._loop_mode = "eager"
    eager = [fp(**kw, generator=_gen(s), output_type="latent").images for s in seeds]
    fp._loop_mode = "static"
    static = [fp(**kw, generator=_gen(s), output_type="latent").images for s in seeds]
    return eager, static


def _scheduler(pipe, name: str, extra: dict):
    # as keyword arguments: diffusers' from_config drops a config-dict key its `_use_default_values` lists (the SD 1.5
    # PNDM config's prediction_type), so {**config, "prediction_type": ...} would build an epsilon scheduler
    scheduler = samplers.get(name).from_config(pipe.scheduler.config, **extra)
    assert all(scheduler.config[k] == v for k, v in extra.items())
    return scheduler


# ----------------------------------------------------------------------------------------- static == eager
@pytest.mark.parametrize("rule_name,rule", RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize("sampler,extra", SOLVERS, ids=[f"{s}{e.get('solver_order', '')}" for s, e in SOLVERS])
def test_static_step_equals_eager_loop_sd(sd, sampler, extra, rule_name, rule):
    fp = FewstepPipeline.from_pipe(sd, scheduler=_scheduler(sd, sampler, extra), guidance=rule)
    eager, static = _both(fp, **_sd_embeds(), num_inference_steps=6)
    for a, b in zip(eager, static):
        assert torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.equal(eager[0], eager[1])  # the seeds differ: the reused buffers were reloaded


@pytest.mark.parametrize("rule_name,rule", RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize("sampler,extra", SOLVERS, ids=[f"{s}{e.get('solver_order', '')}" for s, e in SOLVERS])
def test_static_step_equals_eager_loop_sd3(sd3, sampler, extra, rule_name, rule):
    fp = FewstepPipeline.from_pipe(sd3, scheduler=_scheduler(sd3, sampler, extra), guidance=rule)
    eager, static = _both(fp, **_flow_embeds(), height=SIZE, width=SIZE, num_inference_steps=5)
    for a, b in zip(eager, static):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_static_step_other_families_and_settings(sdxl, flux, sd):
    # SDXL added conditions, APG in eps space without momentum
    fp = FewstepPipeline.from_pipe(sdxl, scheduler="unipc", guidance=guidance.APG(3.0, space="eps", momentum=0.0))
    eager, static = _both(fp, **_sd_embeds(1, pooled=True), num_inference_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(eager, static))
    # Flux: the distilled guidance embedding (one call per step) and true CFG (two calls per step)
    fp = FewstepPipeline.from_pipe(flux, scheduler="dpm-solver++")
    kw = _flow_embeds(1)
    pos = {k: v for k, v in kw.items() if "negative" not in k}
    eager, static = _both(fp, **pos, height=SIZE, width=SIZE, num_inference_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(eager, static))
    eager, static = _both(fp, **kw, guidance="cfg++", guidance_scale=0.6, height=SIZE, width=SIZE,
                          num_inference_steps=4)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(eager, static))
    # a CFG scale schedule with guidance_rescale, v-prediction, clip_sample
    settings = {"prediction_type": "v_prediction", "clip_sample": True, "clip_sample_range": 0.5}
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance=guidance.CFG([7.0, 5.0, 3.0, 2.0], 0.7))
    fp.pipe.scheduler = _scheduler(sd, "ddim", settings)  # after from_pipe, which applies SD's clip_sample=False fix
    eager, static = _both(fp, **_sd_embeds(1), num_inference_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(eager, static))
    assert fp.pipe.scheduler.config.clip_sample and fp.pipe.scheduler.config.prediction_type == "v_prediction"
    # a stochastic solver, unguided (CFG 1: the conditional model alone) and guided: noise drawn from `generator`
    sde = _scheduler(sd, "dpm-solver++", {"algorithm_type": "sde-dpmsolver++"})
    for rule in (guidance.CFG(1.0), guidance.APG(3.0, norm_threshold=2.0)):
        fp = FewstepPipeline.from_pipe(sd, scheduler=sde, guidance=rule)
        eager, static = _both(fp, **_sd_embeds(1), num_inference_steps=4)
        assert all(torch.equal(a, b) for a, b in zip(eager, static)) and not torch.equal(*eager)


def test_static_step_flow_euler_sd3(sd3):
    fp = FewstepPipeline.from_pipe(sd3, scheduler="flow-euler", guidance="cfg++", guidance_scale=0.6)
    eager, static = _both(fp, **_flow_embeds(1), height=SIZE, width=SIZE, num_inference_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(eager, static))


def test_static_step_dpm_solver_v3_and_decoded_images(sd):
    sched = _scheduler(sd, "dpm-solver-v3", {"degenerated": True})
    fp = FewstepPipeline.from_pipe(sd, scheduler=sched, guidance="apg", guidance_scale=3.0)
    eager, static = _both(fp, **_sd_embeds(1), num_inference_steps=5)
    for a, b in zip(eager, static):  # v3's per-element terms are summed in another order: float rounding only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    fp._loop_mode = "eager"
    img_eager = fp(**_sd_embeds(1), num_inference_steps=3, generator=_gen(), output_type="np").images
    fp._loop_mode = "static"
    img_static = fp(**_sd_embeds(1), num_inference_steps=3, generator=_gen(), output_type="np").images
    np.testing.assert_allclose(img_eager, img_static, atol=1e-6)


def test_apg_momentum_lives_in_a_static_buffer_reset_per_generation():
    rule = guidance.APG(3.0, norm_threshold=None, momentum=-0.5)
    static = StaticGuidance(rule, (1, 2, 2, 2), "cpu", torch.float32)
    cols = torch.as_tensor(static.columns(np.array([0.9, 0.8]), np.array([0.4, 0.6])), dtype=torch.float32)
    g = _gen()
    pairs = [tuple(torch.randn(1, 2, 2, 2, generator=g) for _ in range(4)) for _ in range(2)]
    for _ in range(2):  # two generations: the second must not see the first one's momentum
        rule.reset()
        static.reset()
        for i, (c0, c1, u0, u1) in enumerate(pairs):
            from fewstep.guidance import StepState

            want = rule((c0, c1), (u0, u1), StepState(i, 2, [0.9, 0.8][i], [0.4, 0.6][i]))
            got = static.combine((c0, c1), (u0, u1), *cols[i])
            assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert static.momentum is not None and static.momentum.abs().sum() > 0


def test_static_engine_refuses_momentum_and_checks_noise(sd):
    hb = samplers.get("hb").from_config(sd.scheduler.config)
    hb.set_timesteps(4)
    with pytest.raises(ValueError, match="momentum samplers .* static step"):
        StaticEngine(hb.plan, (1, 4, 8, 8), "cpu", torch.float32)
    sde = _scheduler(sd, "dpm-solver++", {"algorithm_type": "sde-dpmsolver++"})
    sde.set_timesteps(3)
    engine = StaticEngine(sde.plan, (1, 4, 8, 8), "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"`noise` must have shape \(3, 1, 4, 8, 8\), got None"):
        engine.reset(None)


def test_compiled_denoiser_compiles_once_per_batch_size_across_loops(sd):
    """With ``compile={..., "dynamic": False}`` (what bench_pipeline_cuda passes), the eager loop and the static
    step (what graph mode captures) trace the UNet alike: one compile per batch size, shared by both loops and
    by repeated calls -- no recompilation from the step index, the timestep values or the buffers."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        setting = {"backend": counting_backend, "dynamic": False}
        eager = FewstepPipeline.from_pipe(sd, scheduler="dpm-solver++", guidance="apg", guidance_scale=3.0,
                                          compile=setting)  # fmt: skip
        static = FewstepPipeline.from_pipe(sd, scheduler="dpm-solver++", guidance="apg", guidance_scale=3.0,
                                           compile=setting)  # fmt: skip
        static._loop_mode = "static"
        counts = []
        for n in (1, 2):
            for fp in (eager, static, eager, static):
                fp(**_sd_embeds(n), num_inference_steps=3, output_type="latent")
                counts.append(len(graphs))
    finally:
        torch._dynamo.reset()
    assert counts == [1, 1, 1, 1, 2, 2, 2, 2]


# ------------------------------------------------------------------------------------------------- errors
def test_graph_mode_errors(sd):
    with pytest.raises(ValueError, match="needs a fewstep scheduler: PNDMScheduler .* cannot be captured; use one of"):
        FewstepPipeline.from_pipe(sd, cuda_graph=True)  # the base pipeline's own (diffusers) scheduler
    with pytest.raises(ValueError, match="cannot replay FewstepHeavyBallScheduler"):
        FewstepPipeline.from_pipe(sd, scheduler="hb", cuda_graph=True)
    with pytest.raises(ValueError, match="`cuda_graph` must be a bool, got 'yes'"):
        FewstepPipeline.from_pipe(sd, scheduler="ddim", cuda_graph="yes")
    for setting in ("reduce-overhead", "max-autotune", {"options": {"triton.cudagraphs": True}}):
        with pytest.raises(ValueError, match=r"`compile`=.* captures CUDA graphs itself .* use 'max-autotune-no-cud"):
            FewstepPipeline.from_pipe(sd, scheduler="ddim", cuda_graph=True, compile=setting)
    if not CUDA:
        with pytest.raises(ValueError, match=r"needs the pipeline on a CUDA device, got cpu"):
            FewstepPipeline.from_pipe(sd, scheduler="ddim", cuda_graph=True)

    class Custom(guidance.CFG):
        pass

    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim")
    fp._loop_mode = "static"
    with pytest.raises(ValueError, match=r"supports the guidance rules \['cfg', 'cfg\+\+', 'apg'\], got Custom"):
        fp(**_sd_embeds(1), guidance=Custom(3.0), num_inference_steps=2, output_type="latent")
    fp._loop_mode = "eager"
    fp.pipe.scheduler = PNDMScheduler.from_config(SD15_PNDM)
    fp._loop_mode = "static"
    with pytest.raises(ValueError, match="needs a fewstep scheduler: PNDMScheduler"):
        fp(**_sd_embeds(1), num_inference_steps=2, output_type="latent")


def test_graph_mode_callback_may_not_replace_latents(sd):
    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc", guidance="cfg", guidance_scale=3.0)
    fp._loop_mode = "static"
    kw = dict(**_sd_embeds(1), num_inference_steps=3, output_type="latent")

    def replace(pipe, i, t, tensors):
        return {"latents": tensors["latents"] * 0}

    with pytest.raises(ValueError, match="callback_on_step_end returned a new `latents` at step 0: with cuda_graph"):
        fp(**kw, callback_on_step_end=replace)

    def in_place(pipe, i, t, tensors):
        if i == 2:
            tensors["latents"].zero_()
        return {"latents": tensors["latents"]}

    seen = []
    out = fp(**kw, callback_on_step_end=in_place).images
    assert torch.equal(out, torch.zeros_like(out))
    fp(**kw, callback_on_step_end=lambda p, i, t, tensors: seen.append(i) or {})
    assert seen == [0, 1, 2]


# ------------------------------------------------------------------------------------- quantized, compile
def _calibration(n: int = 6) -> quant.CalibrationSet:
    g = _gen(5)
    return quant.CalibrationSet(
        sample=torch.randn(n, 4, 8, 8, generator=g), timestep=torch.linspace(900, 50, n),
        encoder_hidden_states=torch.randn(n, 5, 16, generator=g), settings={"method": "test"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def qdir(sd, tmp_path_factory):
    qmodel = quant.quantize(sd.unet, _calibration(), quant.QuantConfig(act_grid=10, weight_grid=10))
    path = tmp_path_factory.mktemp("q") / "unet-w8a8"
    quant.save_quantized(qmodel, path)
    return path, qmodel


def test_quantized_denoiser(sd, qdir):
    path, qmodel = qdir
    kw = dict(**_sd_embeds(1), num_inference_steps=3, generator=_gen(), output_type="latent")
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", quantized=path)
    assert quant.quant_layers(fp.pipe.unet) and not quant.quant_layers(sd.unet)  # the base pipeline keeps its UNet
    assert fp.denoiser is fp.pipe.unet and fp.pipe.vae is sd.vae
    ours = fp(**kw).images
    ref = FewstepPipeline.from_pipe(sd, scheduler="ddim")(**{**kw, "generator": _gen()}).images
    assert torch.isfinite(ours).all() and not torch.equal(ours, ref)
    assert (ours - ref).abs().max() < 0.5 * ref.abs().max()  # 8-bit, still the same model
    given = FewstepPipeline.from_pipe(sd, scheduler="ddim", quantized=qmodel, quant_mode="fake")
    torch.testing.assert_close(given(**{**kw, "generator": _gen()}).images, ours, rtol=0, atol=1e-5)
    # graph mode's static step runs the quantized denoiser too
    fp._loop_mode = "static"
    assert torch.equal(fp(**{**kw, "generator": _gen()}).images, ours)


def test_quantized_bad_input(sd, qdir, tmp_path):
    path, _ = qdir
    with pytest.raises(ValueError, match="`quantized` must be a directory written by .*: not a directory"):
        FewstepPipeline.from_pipe(sd, scheduler="ddim", quantized=tmp_path / "missing")
    with pytest.raises(ValueError, match="`quantized` module \\(UNet2DConditionModel\\) is not a fewstep.quant model"):
        FewstepPipeline.from_pipe(sd, scheduler="ddim", quantized=sd.unet)
    with pytest.raises(ValueError, match=r"`quant_mode` must be one of \['fake', 'int8', .*\], got 'int4'"):
        FewstepPipeline.from_pipe(sd, scheduler="ddim", quantized=path, quant_mode="int4")
    with pytest.raises(ValueError, match="`quant_mode`='int8' needs `quantized`"):
        FewstepPipeline.from_pipe(sd, scheduler="ddim", quant_mode="int8")
    with pytest.raises(ValueError, match="`quantized` must be None, a directory .* got int"):
        FewstepPipeline.from_pipe(sd, scheduler="ddim", quantized=3)


def test_torch_compile_denoiser(sd):
    kw = dict(**_sd_embeds(1), num_inference_steps=2, output_type="latent")
    ref = FewstepPipeline.from_pipe(sd, scheduler="unipc")(**kw, generator=_gen()).images
    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc", compile={"backend": "eager"})
    assert fp.denoiser is not fp.pipe.unet and fp.pipe.unet is sd.unet  # compiled wrapper; the module is shared
    assert isinstance(fp.denoiser, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(fp(**kw, generator=_gen()).images, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "compile,message",
    [
        ("fast", r"`compile` mode must be one of \['default', 'reduce-overhead', 'max-autotune'"),
        ({"backnd": "eager"}, r"`compile` has unknown option\(s\) \['backnd'\]; allowed: \['mode', 'backend'"),
        ({"fullgraph": "yes"}, r"`compile\['fullgraph'\]` must be a bool"),
        ({"mode": "default", "options": {}}, "either 'mode' or 'options', not both"),
        (3, r"`compile` must be a bool, a mode in .* got int"),
    ],
)
def test_compile_bad_input(sd, compile, message):
    with pytest.raises(ValueError, match=message):
        FewstepPipeline.from_pipe(sd, scheduler="ddim", compile=compile)


def _param_dtypes(pipe) -> dict:
    return {f"{m}.{n}": p.dtype for m in ("transformer", "unet", "vae") if getattr(pipe, m, None) is not None
            for n, p in getattr(pipe, m).named_parameters()}


def test_from_pipe_keeps_a_half_precision_pipeline_in_its_dtype():
    """diffusers' own ``from_pipe`` casts the new pipeline -- and so the shared modules -- to float32 unless told
    a dtype (a bf16 SD3 then fails with mixed dtypes; a fp16 UNet silently runs in float32). FewstepPipeline
    must leave the modules it shares exactly as they were, and run."""
    torch.manual_seed(0)
    sd3 = StableDiffusion3Pipeline(
        transformer=_sd3_transformer(), scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_FLOW),
        vae=_flow_vae(4), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    ).to(dtype=torch.bfloat16)  # fmt: skip
    before = _param_dtypes(sd3)
    assert set(before.values()) == {torch.bfloat16}
    fp = FewstepPipeline.from_pipe(sd3, scheduler="unipc", guidance="apg", guidance_scale=3.0)
    fp.set_progress_bar_config(disable=True)
    assert _param_dtypes(sd3) == before
    kw = {k: v.to(torch.bfloat16) for k, v in _flow_embeds(1).items()}
    out = fp(**kw, height=SIZE, width=SIZE, num_inference_steps=2, output_type="latent", generator=_gen()).images
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    torch.manual_seed(0)
    sd = StableDiffusionPipeline(
        vae=_vae(), text_encoder=None, tokenizer=None, unet=_unet(), scheduler=PNDMScheduler.from_config(SD15_PNDM),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(dtype=torch.bfloat16)  # fmt: skip
    before, config, scheduler = _param_dtypes(sd), dict(sd.config), sd.scheduler
    fp = FewstepPipeline.from_pipe(sd, scheduler="dpm-solver++", guidance="cfg++", guidance_scale=0.5)
    assert _param_dtypes(sd) == before
    # the base pipeline keeps its own scheduler and config; the modules are shared, not copied
    assert sd.scheduler is scheduler and dict(sd.config) == config and fp.pipe.unet is sd.unet
    assert type(fp.scheduler).__name__ != type(scheduler).__name__


# ------------------------------------------------------------------------------------------ real capture
@pytest.mark.skipif(not CUDA, reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("sampler,extra", SOLVERS, ids=[f"{s}{e.get('solver_order', '')}" for s, e in SOLVERS])
def test_cuda_graph_matches_eager_on_cuda(sd, sampler, extra, monkeypatch):
    # float32 convs (cuDNN's default TF32 differs between algorithms, and capture may pick another algorithm)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    pipe = StableDiffusionPipeline.from_pipe(sd).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kw = {k: v.cuda() for k, v in _sd_embeds(2).items()}
    for _, rule in RULES:
        eager = FewstepPipeline.from_pipe(pipe, scheduler=_scheduler(pipe, sampler, extra), guidance=rule)
        graph = FewstepPipeline.from_pipe(pipe, scheduler=_scheduler(pipe, sampler, extra), guidance=rule,
                                          cuda_graph=True)  # fmt: skip
        for seed in (1, 2):  # the second call replays the graph captured by the first
            run = dict(**kw, num_inference_steps=6, output_type="latent")
            a = eager(**run, generator=torch.Generator("cuda").manual_seed(seed)).images
            b = graph(**run, generator=torch.Generator("cuda").manual_seed(seed)).images
            # the graph's coefficients are float32 device tensors, eager's Python floats: a last-bit difference
            # the random UNet amplifies over the steps (measured 2e-4 on an H200 with TF32 convs)
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
        assert graph._graph_cache is not None and graph._graph_cache[1].graph is not None


@pytest.mark.skipif(not CUDA, reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_sd3_fp16(sd3):
    pipe = StableDiffusion3Pipeline.from_pipe(sd3).to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    kw = {k: v.cuda().half() for k, v in _flow_embeds(1).items()}
    run = dict(**kw, height=SIZE, width=SIZE, num_inference_steps=5, output_type="latent")
    eager = FewstepPipeline.from_pipe(pipe, scheduler="unipc", guidance="apg", guidance_scale=3.0)
    graph = FewstepPipeline.from_pipe(pipe, scheduler="unipc", guidance="apg", guidance_scale=3.0, cuda_graph=True)
    a = eager(**run, generator=torch.Generator("cuda").manual_seed(0)).images.float()
    b = graph(**run, generator=torch.Generator("cuda").manual_seed(0)).images.float()
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------------------- benchmark script
def _bench_module():
    from _helpers import load_script

    return load_script("bench_pipeline_cuda")  # imports without a GPU


def test_pipeline_benchmark_refuses_cpu_and_smoke_runs_tiny(tmp_path, capsys):
    bench = _bench_module()
    if not CUDA:
        with pytest.raises(SystemExit, match=r"needs a CUDA GPU \(none visible to torch\)"):
            bench.main(["--steps", "2"])
    with pytest.raises(SystemExit):  # argparse: the full-size model is not run on the CPU
        bench.main(["--device", "cpu"])
    out = tmp_path / "bench.json"
    results = bench.main(["--device", "cpu", "--tiny", "--steps", "2,3", "--batches", "1,2", "--repeats", "1",
                          "--warmup", "0", "--out", str(out)])  # fmt: skip
    assert [(c["nfe"], c["batch"]) for c in results["cells"]] == [(2, 1), (2, 2), (3, 1), (3, 2)]
    assert all(c["stock_over_graph"] > 0 and set(c["ms_per_image"]) == {"stock", "eager", "graph"}
               for c in results["cells"])  # fmt: skip
    assert results["images_agree"] and results["graph_vs_eager_image_max_abs_diff"] == 0.0  # static == eager on CPU
    assert "stock/graph" in capsys.readouterr().out
    assert json.loads(out.read_text()) == results  # written after each cell, then whole
    assert results["compile"] == "none" and results["dtype"] == "float32"
    assert results["channels_last"] is False and results["fuse_qkv"] is False
    # diffusers' speed recipe on the shared UNet: channels_last + fused q/k/v; the static step still equals eager
    recipe = bench.main(["--device", "cpu", "--tiny", "--steps", "2", "--batches", "2", "--repeats", "1", "--warmup",
                         "0", "--channels-last", "--fuse-qkv"])  # fmt: skip
    assert recipe["channels_last"] and recipe["fuse_qkv"] and recipe["images_agree"]
    assert recipe["graph_vs_eager_image_max_abs_diff"] == 0.0
    with pytest.raises(SystemExit):  # the digits UNet2DModel cannot fuse q/k/v
        bench.parse_args(["--model", "digits", "--fuse-qkv"])
    assert bench.parse_args(["--compile", "default"]).compile == "default"
    with pytest.raises(SystemExit):
        bench.parse_args(["--compile", "fast"])
    # the embedded digits model: stock = its pipeline with diffusers' scheduler; CFG 3 by default
    digits = bench.main(["--device", "cpu", "--model", "digits", "--steps", "2", "--batches", "3", "--repeats", "1",
                         "--warmup", "0"])  # fmt: skip
    assert digits["model"].startswith("digits-eps") and digits["guidance"] == "cfg 3.0"
    assert digits["stock_scheduler"] == "ClassConditionalPipeline + DPMSolverMultistepScheduler"
    assert [(c["nfe"], c["batch"]) for c in digits["cells"]] == [(2, 3)] and digits["images_agree"]
    assert bench.parse_args(["--model", "sd15"]).guidance_scale == 7.5
    # a pipeline that fails (graph capture, say) is recorded; the other timings and cells are kept
    real_time_call, calls = bench.time_call, {"n": 0}

    def failing(fn, device, warmup, repeats):
        calls["n"] += 1
        if calls["n"] == 3:  # the first cell's graph pipeline
            raise RuntimeError("capture failed")
        return real_time_call(fn, device, warmup, repeats)

    bench.time_call = failing
    try:
        broken = bench.main(["--device", "cpu", "--model", "digits", "--steps", "2", "--batches", "1,2", "--repeats",
                             "1", "--warmup", "0"])  # fmt: skip
    finally:
        bench.time_call = real_time_call
    assert broken["errors"] == {"graph nfe 2 batch 1": "RuntimeError: capture failed"}
    first, second = broken["cells"]
    assert np.isnan(first["stock_over_graph"]) and first["ms_per_image"]["eager"] > 0
    assert second["stock_over_graph"] > 0
    assert "FAILED graph nfe 2 batch 1: RuntimeError: capture failed" in capsys.readouterr().out


# ------------------------------------------------------------------------------- StaticEngine vs EngineState
@pytest.mark.parametrize(
    "name,config",
    [
        ("ddim", {}),
        ("dpm-solver++", {"solver_order": 3}),
        ("dpm-solver++", {"algorithm_type": "sde-dpmsolver++"}),
        ("unipc", {"solver_order": 3}),
        ("dpm-solver-v3", {"ems_file": "digits-eps", "time_grid": "time_quadratic"}),  # per-element EMS tables
    ],
    ids=["ddim", "dpm3m", "sde-dpm2m", "unipc3", "v3-digits"],
)
def test_static_engine_follows_engine_state(name, config):
    """Fed the same evaluations, the static engine returns EngineState's samples (v3's per-element
    coefficients: to float rounding; the others bit for bit)."""
    import fewstep
    from fewstep.solvers.engine import EngineState

    base = fewstep.load_default("digits-eps", sampler="ddim").scheduler.config
    sched = samplers.get(name).from_config(base, **config)  # keywords: the config lists time_grid as a default
    assert all(sched.config[k] == v for k, v in config.items())
    sched.set_timesteps(7)
    shape = (2, 1, 16, 16)
    static = StaticEngine(sched.plan, shape, "cpu", torch.float32)
    g = _gen(4)
    noise = torch.randn(sched.plan.num_steps, *shape, generator=g)
    static.reset(noise if static.stochastic else None)
    state = EngineState(sched.plan)
    x_eager = x_static = torch.randn(shape, generator=g)
    for i in range(sched.plan.num_steps):
        x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)  # any pair (CFG++: inconsistent)
        x_eager = state.advance(i, x_eager, x0, eps, noise[i] if static.stochastic else None)
        x_static = static.advance(x_static, x0, eps)
        static.index.add_(1)
        if name == "dpm-solver-v3":
            torch.testing.assert_close(x_static, x_eager, rtol=1e-5, atol=1e-5)
            x_static = x_eager.clone()  # compare step by step, not accumulated drift
        else:
            assert torch.equal(x_static, x_eager), i
    assert int(static.index) == sched.plan.num_steps


def test_static_mode_checks_finiteness_after_the_callback_as_eager(sd):
    """Found by probing: the static loop checked the latents before the callback ran, so a NaN written by the
    callback at the last step passed silently and earlier ones were reported one step late."""
    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc", guidance="cfg", guidance_scale=3.0)
    kw = dict(**_sd_embeds(1), num_inference_steps=3, output_type="latent", check_finite=True)
    for step in (0, 2):
        def poison(pipe, i, t, tensors, step=step):
            if i == step:
                tensors["latents"].fill_(float("nan"))
            return {"latents": tensors["latents"]}

        for mode in ("eager", "static"):
            fp._loop_mode = mode
            with pytest.raises(FloatingPointError, match=rf"NaN/Inf at step {step} of 3"):
                fp(**kw, callback_on_step_end=poison)


def test_static_mode_callback_that_changes_the_batch_gets_the_eager_advice(sd):
    """diffusers' CFG-cutoff callback returns half-batch embeddings: static mode gave the in-place advice, which
    cannot apply to another shape; both modes now point to a per-step guidance scale."""
    from diffusers.callbacks import SDCFGCutoffCallback

    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc", guidance="cfg", guidance_scale=3.0)
    for mode in ("eager", "static"):
        fp._loop_mode = mode
        with pytest.raises(ValueError, match=r"returned `prompt_embeds` of shape .* per-step scale"):
            fp(**_sd_embeds(1), num_inference_steps=4, output_type="latent",
               callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))


def test_attention_kwargs_cache_key_tells_large_tensors_apart():
    """The graph cache key of attention kwargs was their repr, which abbreviates tensors over 1000 elements: two
    different bias tensors gave one key, and a captured step would have replayed with the first one."""
    from fewstep.pipelines.graph_step import kwargs_cache_key

    a, b = torch.zeros(2000), torch.zeros(2000)
    b[1000] = 500.0
    assert repr({"bias": a}) == repr({"bias": b})
    assert kwargs_cache_key({"bias": a}) != kwargs_cache_key({"bias": b})
    assert kwargs_cache_key({"bias": a, "scale": 0.5}) == kwargs_cache_key({"scale": 0.5, "bias": a})
    assert kwargs_cache_key({"scale": 0.5}) != kwargs_cache_key({"scale": 0.7})
    assert kwargs_cache_key({"bias": a}) != kwargs_cache_key({"bias": a[:1000]})  # same address, other shape
    hash(kwargs_cache_key({"x": [a, {"y": (1, 2)}]}))


def test_a_new_guidance_scale_reuses_the_captured_step(sd):
    """The scale (and a per-step scale list) sits in the device table, so sweeping it replays one graph (it was
    part of the cache key, a recapture per scale); results equal the eager loop's for each scale."""
    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc", guidance="cfg", guidance_scale=3.0)
    kw = dict(**_sd_embeds(1), num_inference_steps=3, output_type="latent")
    fp._loop_mode = "static"
    runs = []
    for scale in (3.0, 5.0, [2.0, 4.0, 6.0]):
        out = fp(**kw, guidance=guidance.CFG(scale), generator=_gen(1)).images
        runs.append(fp._graph_cache[1])
        fp._loop_mode = "eager"
        ref = fp(**kw, guidance=guidance.CFG(scale), generator=_gen(1)).images
        fp._loop_mode = "static"
        assert torch.equal(out, ref)
    assert runs[0] is runs[1] is runs[2]
    fp(**kw, guidance=guidance.CFG(3.0, guidance_rescale=0.5), generator=_gen(1))
    assert fp._graph_cache[1] is not runs[0]  # a setting baked into the step still recaptures


@pytest.mark.parametrize("rule, scales", [("cfg++", (0.3, 0.9)), ("apg", (2.0, 8.0))])
def test_a_new_cfgpp_or_apg_scale_is_not_replayed_with_the_old_one(sd, rule, scales):
    """Found by probing: the cache key dropped every rule's scale, but only CFG's sits in the device table; CFG++'s
    lambda and APG's w are constants of the captured step, so a second call replayed the first call's scale."""
    fp = FewstepPipeline.from_pipe(sd, scheduler="unipc", guidance=rule, guidance_scale=scales[0])
    kw = dict(**_sd_embeds(1), num_inference_steps=3, output_type="latent")
    for scale in scales:
        fp._loop_mode = "static"
        out = fp(**kw, guidance_scale=scale, generator=_gen(1)).images
        fp._loop_mode = "eager"
        ref = fp(**kw, guidance_scale=scale, generator=_gen(1)).images
        assert torch.equal(out, ref)
