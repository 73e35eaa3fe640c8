"""FewstepPipeline hosting the class-conditional digits pipeline (family ``"class"``): the same loop as the SD and
flow families, so its static step (what ``cuda_graph=True`` captures) must equal the eager loop, and
``ClassConditionalPipeline.__call__`` (which runs that loop) must equal a hand-written guided loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_fewstep_pipeline_graph import RULES, SOLVERS, _sd_embeds
from test_fewstep_pipeline_graph import sd as sd  # noqa: F401  (fixture)
from test_guided_pipeline import DDPM, FLOW, _pipe, _unet

from fewstep import guidance, quant, samplers
from fewstep.pipelines import ClassConditionalPipeline, FewstepPipeline

CUDA = torch.cuda.is_available()
LABELS = [3, 7, 0]


@pytest.fixture(scope="module")
def unet():
    return _unet()


def _latents(n: int = len(LABELS), seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _scheduler(name: str, extra: dict | None = None, config: dict = DDPM):
    return samplers.get(name).from_config({**config, **(extra or {})})


def _both(fp: FewstepPipeline, seeds=(1, 2), **kw) -> tuple[list, list]:
    """Latents of the eager loop and of the static step (the second static call reuses the buffers)."""
    out = {}
    for mode in ("eager", "static"):
        fp._loop_mode = mode
        out[mode] = [fp(class_labels=LABELS, latents=_latents(seed=s), output_type="latent", **kw).images
                     for s in seeds]  # fmt: skip
    return out["eager"], out["static"]


@pytest.mark.parametrize("rule_name,rule", RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize("sampler,extra", SOLVERS, ids=[f"{s}{e.get('solver_order', '')}" for s, e in SOLVERS])
def test_static_step_equals_eager_loop_class(unet, sampler, extra, rule_name, rule):
    base = _pipe(unet, "ddim")
    fp = FewstepPipeline.from_pipe(base, scheduler=_scheduler(sampler, extra), guidance=rule)
    assert fp.family == "class" and fp.pipe.unet is unet and base.scheduler is not fp.scheduler
    eager, static = _both(fp, num_inference_steps=5)
    for a, b in zip(eager, static):
        assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.equal(eager[0], eager[1])


def test_static_step_flow_model_and_stochastic_solver(unet):
    fp = FewstepPipeline.from_pipe(_pipe(unet, "ddim", FLOW), scheduler=_scheduler("flow-euler", config=FLOW),
                                   guidance="cfg++", guidance_scale=0.6)  # fmt: skip
    eager, static = _both(fp, num_inference_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(eager, static))
    sde = _scheduler("dpm-solver++", {"algorithm_type": "sde-dpmsolver++"})
    fp = FewstepPipeline.from_pipe(_pipe(unet), scheduler=sde, guidance="apg", guidance_scale=3.0)
    eager, static = [], []
    for mode, into in (("eager", eager), ("static", static)):
        fp._loop_mode = mode
        for seed in (0, 0, 5):
            into.append(fp(class_labels=LABELS, latents=_latents(), generator=torch.Generator().manual_seed(seed),
                           num_inference_steps=4, output_type="latent").images)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(eager, static))
    assert torch.equal(eager[0], eager[1]) and not torch.equal(eager[0], eager[2])  # noise from `generator`


def test_class_pipeline_runs_the_shared_loop_as_a_hand_written_one(unet):
    """``ClassConditionalPipeline`` (through FewstepPipeline's loop) against an independent loop: DDIM, CFG on the
    noise prediction with the null class, ``x_{t-1} = a' x0 + s' eps`` on diffusers' DDIM grid."""
    steps, scale = 4, 3.0
    pipe = _pipe(unet, "ddim")
    got = pipe(LABELS, steps, guidance_scale=scale, latents=_latents(), output_type="latent").images
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    x = _latents().double()
    labels, null = torch.tensor(LABELS), torch.full((3,), 10)
    ts = [int(t) for t in sched.timesteps]
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((3,), t)
            eps_c, eps_u = (unet(x.float(), tt, class_labels=c).sample.double() for c in (labels, null))
            eps = eps_u + scale * (eps_c - eps_u)
            a = alphas_cumprod[t]
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            a_next = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)


def test_from_pipe_class_options_and_outputs(unet, tmp_path):
    base = _pipe(unet, "unipc")
    direct = base(LABELS, 3, guidance="apg", guidance_scale=4.0, latents=_latents(), output_type="latent").images
    fp = FewstepPipeline.from_pipe(base, guidance="apg", guidance_scale=4.0)
    assert fp.guidance.name == "apg" and fp.scheduler is base.scheduler  # None keeps the pipeline's scheduler
    hosted = fp(class_labels=LABELS, num_inference_steps=3, latents=_latents(), output_type="latent").images
    assert torch.equal(direct, hosted)
    # default rule of the family: CFG 3, as ClassConditionalPipeline's
    cfg = FewstepPipeline.from_pipe(base)
    assert isinstance(cfg.guidance, guidance.CFG) and cfg.guidance.config()["guidance_scale"] == 3.0
    # output types as ClassConditionalPipeline's; num_images_per_prompt repeats each label
    kw = dict(class_labels=[1, 2], num_inference_steps=2, latents=_latents(2))
    arr = fp(**kw, output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 8, 8, 1) and 0 <= arr.min() and arr.max() <= 1
    pils = fp(**kw, output_type="pil").images
    assert len(pils) == 2 and pils[0].mode == "L"
    pt = fp(**kw, output_type="pt").images
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr, atol=1e-6)
    four = fp(class_labels=[1, 2], num_images_per_prompt=2, num_inference_steps=2, output_type="latent").images
    assert four.shape == (4, 1, 8, 8)
    assert fp.default_image_size() == 8
    as_pt = fp(class_labels=LABELS, num_inference_steps=3, latents=_latents(), output_type="pt").images
    assert torch.equal(fp.decode_latents(hosted), as_pt)  # the latents a "latent" call returned, decoded alike
    # quantized and compiled denoisers through the shared from_pipe options
    g = torch.Generator().manual_seed(2)
    cal = quant.CalibrationSet(sample=torch.randn(8, 1, 8, 8, generator=g), timestep=torch.linspace(950, 20, 8),
                               class_labels=torch.arange(8) % 11)  # fmt: skip
    quant.save_quantized(quant.quantize(unet, cal, quant.QuantConfig(act_grid=10, weight_grid=10)), tmp_path / "q")
    q = FewstepPipeline.from_pipe(base, guidance="apg", guidance_scale=4.0, quantized=tmp_path / "q")
    assert quant.quant_layers(q.pipe.unet) and not quant.quant_layers(base.unet)
    out = q(class_labels=LABELS, num_inference_steps=3, latents=_latents(), output_type="latent").images
    assert torch.isfinite(out).all() and 0 < (out - direct).abs().max() < 0.2 * direct.abs().max()
    compiled = FewstepPipeline.from_pipe(base, guidance="apg", guidance_scale=4.0, compile={"backend": "eager"})
    torch.testing.assert_close(
        compiled(class_labels=LABELS, num_inference_steps=3, latents=_latents(), output_type="latent").images,
        direct, rtol=0, atol=1e-6)


def test_class_callback_may_replace_latents(unet):
    fp = FewstepPipeline.from_pipe(_pipe(unet), guidance="cfg", guidance_scale=2.0)
    seen = []

    def zero_after_first(pipe, i, t, tensors):
        seen.append((i, sorted(tensors)))
        return {"latents": tensors["latents"] * 0} if i == 0 else {}

    kw = dict(class_labels=LABELS, num_inference_steps=3, latents=_latents(), output_type="latent")
    plain = fp(**kw).images
    replaced = fp(**kw, callback_on_step_end=zero_after_first).images
    assert seen == [(0, ["latents"]), (1, ["latents"]), (2, ["latents"])]
    assert not torch.equal(plain, replaced)


def test_check_finite_names_the_first_bad_step(unet, sd):  # noqa: F811
    pipe = _pipe(unet, "ddim")
    calls = {"n": 0}

    def poisoned(x, t, class_labels=None):
        calls["n"] += 1
        out = unet(x, t, class_labels=class_labels)
        if calls["n"] == 3:
            out.sample[0, 0, 0, 0] = float("nan")
        return out

    for mode in ("eager", "static"):
        fp = FewstepPipeline(pipe, guidance.CFG(3.0), denoiser=poisoned)
        fp._loop_mode = mode
        calls["n"] = 0
        with pytest.raises(FloatingPointError, match=r"NaN/Inf at step 2 of 5 \(sampler FewstepDDIMScheduler\)"):
            fp(class_labels=[4], num_inference_steps=5)  # on by default (DESIGN: detected, opt-out)
        calls["n"] = 0
        out = fp(class_labels=[4], num_inference_steps=5, output_type="latent", check_finite=False).images
        assert torch.isnan(out).any()
    # SD family: the same check
    fp = FewstepPipeline.from_pipe(sd, scheduler="ddim", guidance="cfg", guidance_scale=3.0)
    unet_sd = fp.pipe.unet

    def nan_unet(*args, **kwargs):
        out = unet_sd(*args, **kwargs)
        return (out[0] * float("nan"),)

    fp._compiled = nan_unet
    with pytest.raises(FloatingPointError, match=r"NaN/Inf at step 0 of 2"):
        fp(**_sd_embeds(1), num_inference_steps=2, output_type="latent")


def test_class_family_bad_input(unet, sd):  # noqa: F811
    fp = FewstepPipeline.from_pipe(_pipe(unet))
    with pytest.raises(ValueError, match="a class-conditional pipeline takes `class_labels`, not `prompt`"):
        fp(prompt="a seven", num_inference_steps=2)
    with pytest.raises(ValueError, match=r"class label 11 is out of range: this model has classes 0..9"):
        fp(class_labels=[11], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"`class_labels` must be a non-empty list of ints"):
        fp(num_inference_steps=2)
    with pytest.raises(ValueError, match=r"a class-conditional pipeline has no prompt_embeds; allowed: \['latents'\]"):
        fp(class_labels=[1], callback_on_step_end=lambda *a: {},
           callback_on_step_end_tensor_inputs=["prompt_embeds"])  # fmt: skip
    with pytest.raises(ValueError, match=r"`latents` must be a floating tensor of shape \(1, 1, 8, 8\) .* shape "
                                         r"\(2, 1, 8, 8\)"):
        fp(class_labels=[1], latents=_latents(2))
    with pytest.raises(ValueError, match="`check_finite` must be True or False, got 'yes'"):
        fp(class_labels=[1], check_finite="yes")
    with pytest.raises(ValueError, match=r"`num_images_per_prompt` must be an integer >= 1"):
        fp(class_labels=[1], num_images_per_prompt=0)
    with pytest.raises(ValueError, match="`cross_attention_kwargs` applies to text-to-image pipelines"):
        fp(class_labels=[1], cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(ValueError, match="`clip_skip` applies to SD, SDXL and SD3 .* this pipeline is class"):
        fp(class_labels=[1], clip_skip=1)
    sd_fp = FewstepPipeline.from_pipe(sd, scheduler="ddim")
    with pytest.raises(ValueError, match="`class_labels` is for class-conditional pipelines; this one is sd"):
        sd_fp(**_sd_embeds(1), class_labels=[1], num_inference_steps=2)
    uncond = ClassConditionalPipeline(unet=_unet(None), scheduler=_scheduler("ddim"))
    with pytest.raises(ValueError, match="this UNet is unconditional"):
        FewstepPipeline.from_pipe(uncond)(class_labels=[1], num_inference_steps=2)
    with pytest.raises(ValueError, match="`from_pipe` takes the components 'unet' and 'scheduler', got \\['vae'\\]"):
        ClassConditionalPipeline.from_pipe(_pipe(unet), vae=None)
    if not CUDA:
        with pytest.raises(ValueError, match=r"cuda_graph=True needs the pipeline on a CUDA device, got cpu"):
            FewstepPipeline.from_pipe(_pipe(unet), cuda_graph=True)


@pytest.mark.skipif(not CUDA, reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_class_pipeline_matches_eager(unet, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    base = ClassConditionalPipeline(unet=_unet().to("cuda"), scheduler=_scheduler("unipc"))
    base.set_progress_bar_config(disable=True)
    for _, rule in RULES:
        eager = FewstepPipeline.from_pipe(base, guidance=rule)
        graph = FewstepPipeline.from_pipe(base, guidance=rule, cuda_graph=True)
        for seed in (1, 2):  # the second call replays the captured graph
            kw = dict(class_labels=LABELS, num_inference_steps=5, latents=_latents(seed=seed).cuda(),
                      output_type="latent")  # fmt: skip
            torch.testing.assert_close(eager(**kw).images, graph(**kw).images, rtol=1e-3, atol=1e-3)
        assert graph._graph_cache is not None and graph._graph_cache[1].graph is not None


def test_class_pipeline_follows_diffusers_conventions_for_generators_callbacks_and_components(unet):
    """Found by probing: generator lists of the wrong length were truncated or an IndexError, text-to-image
    arguments were silently ignored, callbacks could not read num_timesteps/guidance_scale, and from_pipe took
    a sampler name or a non-module with an AttributeError."""
    pipe = _pipe(unet)
    gens = [torch.Generator().manual_seed(k) for k in range(3)]
    for n in (1, 3):
        with pytest.raises(ValueError, match=rf"`generator` is a list of {n} generators, but the batch has 2 images"):
            pipe([1, 2], num_inference_steps=2, generator=gens[:n])
    fp = FewstepPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match=r"`height`, `negative_prompt`: text-to-image arguments"):
        fp(class_labels=[1], num_inference_steps=2, height=64, negative_prompt="x")
    seen = []

    def callback(p, i, t, tensors):
        seen.append((p.num_timesteps, p.guidance_scale, p.do_classifier_free_guidance, p.interrupt))
        return {}

    fp(class_labels=[1, 2], num_inference_steps=2, guidance_scale=3.0, callback_on_step_end=callback)
    assert seen == [(2, 3.0, True, False)] * 2
    ddim = ClassConditionalPipeline.from_pipe(pipe, scheduler="ddim")
    assert type(ddim.scheduler).__name__ == "FewstepDDIMScheduler"
    with pytest.raises(ValueError, match=r"`scheduler` must be a diffusers/fewstep scheduler or a sampler name"):
        ClassConditionalPipeline.from_pipe(pipe, scheduler=3)
    with pytest.raises(ValueError, match=r"`unet` must be a UNet2DModel, got str"):
        ClassConditionalPipeline.from_pipe(pipe, unet="x")


def test_class_loop_scales_the_start_by_this_calls_init_noise_sigma(unet):
    """Found by probing: the class loop read ``init_noise_sigma`` before ``set_timesteps``, i.e. the previous call's
    value; with s3's analytical first step (init_noise_sigma = sigma_1 / sigma_0) two identical calls differed."""
    afs = {"timesteps": [999.0, 600.0, 300.0], "afs": "zero_x0",
           "decisions": [{"prediction": "data", "order": 1}] * 3}
    fp = FewstepPipeline.from_pipe(_pipe(unet), scheduler=_scheduler("s3", {"s3_schedule": afs}), guidance="cfg",
                                   guidance_scale=3.0)
    runs = [fp(class_labels=LABELS, latents=_latents(), num_inference_steps=2, output_type="latent").images
            for _ in range(2)]
    assert fp.scheduler.init_noise_sigma < 1.0
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    # the first call (fresh scheduler, init_noise_sigma 1.0 before set_timesteps) equals diffusers' convention
    sched = fp.scheduler
    sched.set_timesteps(2)
    x = _latents() * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            model_in = sched.scale_model_input(torch.cat([x, x]), t)
            eps_u, eps_c = unet(model_in, t.reshape(1).expand(6), class_labels=torch.tensor([10] * 3 + LABELS)
                                ).sample.chunk(2)
            x = sched.step(eps_u + 3.0 * (eps_c - eps_u), t, x).prev_sample
    torch.testing.assert_close(runs[0], x, rtol=1e-5, atol=1e-5)


def test_a_compiled_pipeline_refuses_a_replaced_unet(unet):
    """Found by probing: after `pipe.unet = other` a compiled pipeline kept running the old UNet silently. (A tiny
    class-conditional pipeline: the check is on the module's identity, and tracing the digits UNet four times cost
    ~20 s.)"""
    import copy

    from fewstep.pipelines import ClassConditionalPipeline, FewstepPipeline

    base = _pipe(unet, "ddim")
    kw = dict(class_labels=[1], num_inference_steps=2, output_type="np")
    compiled = ClassConditionalPipeline.from_pipe(base, compile={"backend": "eager"})
    compiled(**kw)
    compiled.unet = copy.deepcopy(base.unet)
    with pytest.raises(ValueError, match="was replaced after `compile=` compiled the previous one"):
        compiled(**kw)
    fp = FewstepPipeline.from_pipe(base, compile={"backend": "eager"})
    fp(**kw)
    fp.pipe.unet = copy.deepcopy(base.unet)
    with pytest.raises(ValueError, match="was replaced after `compile=` compiled the previous one"):
        fp(**kw)
