"""Rectified-flow sampling (flow-euler) and FlowChef steering, measurement operators, digits-flow tasks, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import REAL_CONFIGS, TinyDenoiser
from diffusers import FlowMatchEulerDiscreteScheduler

from fewstep import samplers
from fewstep.cli import main
from fewstep.guidance.operators import (
    BoxInpainting,
    GaussianBlur,
    Inpainting,
    RandomInpainting,
    SuperResolution,
    make_operator,
)
from fewstep.solvers.engine import EngineState
from fewstep.solvers.flowchef import (
    EditCost,
    FlowChefConfig,
    FlowChefHook,
    GaussianFill,
    classifier_cost,
    flowchef_update,
    masked_guidance,
    measurement_cost,
)

FLOW_EULER = samplers.get("flow-euler")


def _loop(scheduler, model, steps, hooks=(), **set_kw) -> torch.Tensor:
    if steps is None:
        scheduler.set_timesteps(**set_kw)
    else:
        scheduler.set_timesteps(steps, **set_kw)
    for h in hooks:
        scheduler.add_step_hook(h)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------ flow-euler
@pytest.mark.parametrize("config_name,kw", [
    ("sd3", {"num_inference_steps": 10}),
    ("flux", {"num_inference_steps": 10, "mu": 0.8}),
    ("flux", {"sigmas": list(np.linspace(1.0, 1 / 8, 8)), "mu": 1.15}),  # the Flux pipeline's call
    ("sd3", {"sigmas": list(np.linspace(1.0, 0.1, 6))}),
])
def test_flow_euler_matches_flow_match_euler(config_name, kw):
    config = REAL_CONFIGS[config_name]
    model = TinyDenoiser(3 * 8 * 8)
    ref, ours = FlowMatchEulerDiscreteScheduler.from_config(config), FLOW_EULER.from_config(config)
    kw = dict(kw)
    steps = kw.pop("num_inference_steps", None)
    expected, got = _loop(ref, model, steps, **kw), _loop(ours, model, steps, **kw)
    assert _rel(got, expected) < 1e-5
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=2e-6)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=2e-3)
    assert ours.timesteps.dtype == torch.float32


def test_flow_euler_default_is_digits_flow_scheduler():
    import fewstep

    pipe = fewstep.load_default("digits-flow", sampler="flow-euler")
    assert isinstance(pipe.scheduler, FLOW_EULER) and pipe.scheduler.is_flow
    assert samplers.process_of("flow-euler") == "flow" and "flow-euler" not in samplers.names("diffusion")


@pytest.mark.parametrize("bad", [
    lambda: FLOW_EULER.from_config(REAL_CONFIGS["sd15"]),
    lambda: FLOW_EULER.from_config(REAL_CONFIGS["sdxl"]),
    lambda: FLOW_EULER(prediction_type="epsilon"),
    lambda: FLOW_EULER(stochastic_sampling=True),
    lambda: FLOW_EULER(use_karras_sigmas=True),
    lambda: FLOW_EULER(shift=-1.0),
])
def test_flow_euler_refuses_vp_and_unsupported(bad):
    with pytest.raises(ValueError, match="flow-euler|flow|shift"):
        bad()


def test_vp_only_sampler_refuses_flow_config():
    with pytest.raises(ValueError, match="flow-matching"):
        samplers.get("mrs").from_config(REAL_CONFIGS["sd3"])


def test_flow_euler_needs_mu_for_dynamic_shift():
    sched = FLOW_EULER.from_config(REAL_CONFIGS["flux"])
    with pytest.raises(ValueError, match="mu"):
        sched.set_timesteps(4)


def test_flow_euler_step_on_meta_device():
    sched = FLOW_EULER(shift=3.0)
    sched.set_timesteps(6, device="meta")
    x = torch.empty(1, 3, 4, 4, device="meta")
    for t in sched.timesteps:
        x = sched.step(torch.empty_like(x), t, x).prev_sample
    assert x.device.type == "meta"


# ------------------------------------------------------------------------------------------------ FlowChef math
def _zero_cost(x0_hat):
    return (x0_hat * 0).flatten(1).sum(1)


@pytest.mark.parametrize("name", ["flow-euler", "unipc", "dpm-solver++"])
def test_zero_cost_equals_plain_sampling_exactly(name):
    """A zero cost (no gradient) leaves every step, including UniPC's corrected ones, bit-identical."""
    model = TinyDenoiser(3 * 8 * 8)
    config = REAL_CONFIGS["sd3"]
    plain = _loop(samplers.get(name).from_config(config), model, 8)
    hook = FlowChefHook(_zero_cost, FlowChefConfig(step_size=0.7, inner_steps=2))
    steered = _loop(samplers.get(name).from_config(config), model, 8, hooks=[hook])
    assert torch.equal(plain, steered)


def test_steered_euler_step_uses_the_same_velocity():
    """After the hook moves x, the step is x_next = x_moved + (s_next - s) v with the evaluation's v."""
    sched = FLOW_EULER(shift=3.0)
    sched.set_timesteps(5)
    target = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hook = FlowChefHook(measurement_cost(lambda z: z, target), FlowChefConfig(step_size=0.25))
    state = EngineState(sched.plan, [hook])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=g)
    grid = sched.plan.grid
    for i in range(3):
        v = torch.randn(x.shape, dtype=torch.float64, generator=g)
        s, s_next = grid.sigmas[i], grid.sigmas[i + 1]
        x0, eps = x - s * v, x + (1 - s) * v
        # GD on ||x0_hat - y||^2 with eta: x_moved = x - 2 eta (x0_hat - y)
        x_moved = x - 2 * 0.25 * (x0 - target)
        x_next = state.advance(i, x, x0, eps)
        torch.testing.assert_close(state.sample, x_moved)
        torch.testing.assert_close(x_next, x_moved + (s_next - s) * v)
        ev = state.buffer[-1]
        torch.testing.assert_close(ev.eps - ev.x0, v)  # the buffered velocity is unchanged
        x = x_next


def test_half_step_replaces_observed_pixels():
    """GD with eta = 1/2 on ||m (x0_hat - y)||^2 makes x0_hat agree with y on the mask in one step."""
    op = BoxInpainting(8, box=4)
    x, offset, y = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    moved = flowchef_update(x, offset, measurement_cost(op, op(y)), FlowChefConfig(step_size=0.5))
    torch.testing.assert_close(op(moved + offset), op(y))
    torch.testing.assert_close((moved - x) * (1 - op.mask), torch.zeros_like(x))  # missing pixels untouched


def test_adam_first_step_is_sign_like():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.randn(2, 1, 4, 4) * 10
    moved = flowchef_update(x, torch.zeros_like(x), measurement_cost(lambda z: z, y),
                            FlowChefConfig(step_size=0.1, optimizer="adam"))
    torch.testing.assert_close(moved, 0.1 * torch.sign(y), atol=1e-5, rtol=0)


def test_flowchef_update_needs_no_outer_grad_and_leaves_inputs_alone():
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        moved = flowchef_update(x, torch.zeros_like(x), measurement_cost(lambda z: z, torch.zeros_like(x)),
                                FlowChefConfig(step_size=0.1, inner_steps=3))
    assert not moved.requires_grad
    torch.testing.assert_close(moved, x * 0.8**3)



def test_a_cost_that_does_not_depend_on_x0_steers_nothing():
    """Found by probing: a constant or detached cost raised autograd's 'does not require grad' error; it is a
    zero gradient, i.e. no move (the plain sampler), as a cost like (z * 0).sum() already gave."""
    x = torch.randn(2, 1, 4, 4)
    config = FlowChefConfig(step_size=0.5, inner_steps=2)
    for cost in (lambda z: torch.zeros(z.shape[0]), lambda z: z.detach().pow(2).sum((1, 2, 3))):
        torch.testing.assert_close(flowchef_update(x, torch.zeros_like(x), cost, config), x, rtol=0, atol=0)
    with pytest.raises(TypeError, match="the FlowChef cost must return a tensor"):
        flowchef_update(x, torch.zeros_like(x), lambda z: 1.0, config)


@pytest.mark.parametrize("kwargs,match", [
    ({"step_size": -0.1}, "step_size"),
    ({"step_size": float("nan")}, "step_size"),
    ({"inner_steps": 0}, "inner_steps"),
    ({"steered_steps": -1}, "steered_steps"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"betas": (0.9, 0.99, 0.9)}, r"`betas` must be two numbers \(beta1, beta2\) in \[0, 1\), got \(0.9, 0.99, 0.9\)"),
    ({"betas": 0.9}, r"`betas` must be two numbers .* got 0.9"),
    ({"adam_eps": "1"}, r"`adam_eps` must be a finite number > 0, got '1'"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowChefConfig(**kwargs)


def test_k_larger_than_steps_and_vp_plan_are_refused():
    hook = FlowChefHook(_zero_cost, FlowChefConfig(steered_steps=7))
    flow = FLOW_EULER()
    flow.set_timesteps(6)
    with pytest.raises(ValueError, match=r"steered_steps.*7.*6"):
        EngineState(flow.plan, [hook]).advance(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2),
                                               torch.zeros(1, 1, 2, 2))
    vp = samplers.get("ddim")()
    vp.set_timesteps(6)
    with pytest.raises(ValueError, match="rectified-flow"):
        FlowChefHook(_zero_cost).check_plan(vp.plan.grid.alphas, vp.plan.grid.sigmas, 6)
    with pytest.raises(TypeError, match="cost"):
        FlowChefHook("not callable")


def test_classifier_cost_is_per_image_cross_entropy():
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.randn(4, 1, 4, 4)
    labels = torch.tensor([0, 1, 2, 0])
    got = classifier_cost(clf, labels)(x)
    assert got.shape == (4,)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(clf(x), labels, reduction="none"))
    # a half-precision classifier (a pipeline loaded in fp16/bf16) gets the float32 x0_hat of the solver in its own
    # dtype: it failed inside conv/linear with "Input type (float) and bias type (c10::Half) should be the same"
    for dtype in (torch.float16, torch.bfloat16):
        half = classifier_cost(clf.to(dtype), labels)(x)
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, got, atol=0.05, rtol=0.05)
    clf.float()


def test_flowchef_with_a_half_precision_pipeline_and_classifier():
    import fewstep
    from fewstep.pipelines.flowchef import flowchef_sample, make_task

    pipe = fewstep.load_default("digits-flow", sampler="flow-euler", torch_dtype=torch.bfloat16)
    clf = fewstep.load_default("digits-classifier", torch_dtype=torch.bfloat16)
    x = flowchef_sample(pipe, make_task("classifier", labels=[3], classifier=clf), class_labels=[3],
                        num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.as_tensor(x)).all()


# ------------------------------------------------------------------------------------------------ operators
OPERATORS = [
    BoxInpainting(16, box=6),
    RandomInpainting(16, drop=0.5, seed=3),
    SuperResolution(2),
    SuperResolution(4),
    GaussianBlur(5, 1.0),
    GaussianBlur(7, 2.0),
]


@pytest.mark.parametrize("op", OPERATORS, ids=lambda o: repr(o))
def test_operator_adjointness(op):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randn(op.output_shape(x.shape), generator=g, dtype=torch.float64)
    ax = op(x)
    assert tuple(ax.shape) == op.output_shape(x.shape)
    lhs, rhs = (ax * y).sum(), (x * op.adjoint(y)).sum()
    assert abs(float(lhs - rhs)) < 1e-10 * max(1.0, abs(float(lhs)))


def test_operator_shapes_and_bad_shapes():
    assert SuperResolution(4).output_shape((2, 1, 16, 16)) == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="not divisible"):
        SuperResolution(2)(torch.zeros(1, 1, 15, 16))
    with pytest.raises(ValueError, match="does not fit the mask"):
        BoxInpainting(16)(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="NCHW"):
        GaussianBlur()(torch.zeros(16, 16))
    with pytest.raises(ValueError, match="measurement shape"):
        SuperResolution(2).check_measurement(torch.zeros(1, 1, 16, 16), (1, 1, 16, 16))
    with pytest.raises(ValueError, match="kernel_size"):
        GaussianBlur(kernel_size=4)
    with pytest.raises(ValueError, match="noise_std"):
        SuperResolution(2, noise_std=-1)
    with pytest.raises(ValueError, match="box"):
        BoxInpainting(8, box=8)
    with pytest.raises(ValueError, match="mask"):
        Inpainting(torch.full((1, 1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="unknown measurement task"):
        make_operator("colorize", 16)


def test_measure_is_seeded_and_noise_stays_on_observed_pixels():
    op = BoxInpainting(16, box=6, noise_std=0.1)
    x = torch.zeros(2, 1, 16, 16)
    y1 = op.measure(x, torch.Generator().manual_seed(5))
    y2 = op.measure(x, torch.Generator().manual_seed(5))
    assert torch.equal(y1, y2) and y1.abs().sum() > 0
    assert torch.all(y1 * (1 - op.mask) == 0)
    assert torch.equal(SuperResolution(2).measure(x), torch.zeros(2, 1, 8, 8))


# ------------------------------------------------------------------------------------------------ digits-flow
@pytest.fixture(scope="module")
def flow_pipe():
    import fewstep

    torch.manual_seed(0)
    return fewstep.load_default("digits-flow", sampler="flow-euler")


def test_flowchef_keeps_nfe_and_restores_inpainting(flow_pipe):
    from fewstep.bench.image_metrics import psnr
    from fewstep.datasets import load_digits_images, to_unit_range
    from fewstep.pipelines.flowchef import DEFAULT_CONFIGS, flowchef_sample, make_task

    images, _ = load_digits_images(16, "test")
    truth = images[:6]
    task = make_task("inpaint", truth)
    calls = []
    unet_forward = flow_pipe.unet.forward

    def counting(*a, **k):
        calls.append(1)
        return unet_forward(*a, **k)

    latents = torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    flow_pipe.unet.forward = counting
    try:
        steered = flowchef_sample(flow_pipe, task, num_images=6, num_inference_steps=10, latents=latents,
                                  config=DEFAULT_CONFIGS["inpaint"])
    finally:
        flow_pipe.unet.forward = unet_forward
    assert len(calls) == 10  # NFE unchanged
    plain = flowchef_sample(flow_pipe, None, num_images=6, num_inference_steps=10, latents=latents)
    q_steered = psnr(to_unit_range(steered), to_unit_range(truth)).mean()
    q_plain = psnr(to_unit_range(plain), to_unit_range(truth)).mean()
    assert q_steered > 22 and q_steered > q_plain + 8


def test_gaussian_fill_is_the_conditional_mean_of_a_gaussian():
    """With ridge 0 and scale 1 the fill of an observed move is E[x_h | x_o] under N(0, Sigma); checked against
    the precision-matrix form ``-P_hh^-1 P_ho x_o``, an independent formula."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    cov = a @ a.T + 0.5 * torch.eye(12, dtype=torch.float64)
    observed = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1]).reshape(1, 3, 4)
    fill = GaussianFill(cov, observed, ridge=0.0, scale=1.0)
    x = torch.randn(5, 1, 3, 4, generator=g, dtype=torch.float64)
    delta = x * observed  # a move confined to the observed pixels, as a masked cost gives
    out = fill(delta.float()).double()
    o, h = observed.reshape(-1).bool(), ~observed.reshape(-1).bool()
    prec = torch.linalg.inv(cov)
    expected = -(torch.linalg.inv(prec[h][:, h]) @ prec[h][:, o] @ x.reshape(5, -1)[:, o].T).T
    torch.testing.assert_close(out.reshape(5, -1)[:, h], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.reshape(5, -1)[:, o], x.reshape(5, -1)[:, o], rtol=1e-6, atol=1e-6)  # kept
    half = GaussianFill(cov, observed, ridge=0.0, scale=0.5)(delta.float()).double()
    torch.testing.assert_close(half.reshape(5, -1)[:, h], 0.5 * expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("args", "match"), [
    ((torch.eye(4), torch.ones(3)), r"`observed` has 3 elements but `covariance` is over D = 4 pixels"),
    ((torch.ones(4, 3), torch.ones(4)), r"`covariance` must be a square \[D, D\] matrix .*got shape \(4, 3\)"),
    ((torch.eye(4), torch.tensor([0, 1, 2, 1])), r"`observed` must be a 0/1 \(or boolean\) mask"),
    ((torch.eye(4), torch.ones(4)), r"must mark some pixels observed and some not"),
])
def test_gaussian_fill_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        GaussianFill(*args)


def test_gaussian_fill_bad_settings_and_shapes():
    mask = torch.tensor([1, 0, 1, 1])
    with pytest.raises(ValueError, match=r"`ridge` must be a finite number >= 0, got -1"):
        GaussianFill(torch.eye(4), mask, ridge=-1)
    with pytest.raises(ValueError, match=r"`scale` must be a finite number >= 0, got nan"):
        GaussianFill(torch.eye(4), mask, scale=float("nan"))
    with pytest.raises(ValueError, match=r"built for images of 4 values, got a move of shape \(2, 1, 3, 3\)"):
        GaussianFill(torch.eye(4), mask)(torch.zeros(2, 1, 3, 3))
    with pytest.raises(TypeError, match="`propagate` must be callable"):
        FlowChefHook(lambda x: x.sum(), propagate=3)


def test_gaussian_fill_lifts_flowchef_inpainting_and_keeps_nfe(flow_pipe):
    """The fill moves the hole, which gradient skipping leaves to the model: on held-out digits (not the tuning
    slice) box inpainting gains PSNR at the same NFE, and the observed pixels still match the measurement."""
    from fewstep.bench.image_metrics import psnr
    from fewstep.datasets import held_out_digits, to_unit_range
    from fewstep.pipelines.flowchef import DEFAULT_CONFIGS, flowchef_sample, inpainting_fill, make_task

    truth, _ = held_out_digits(16, offset=100)
    task = make_task("inpaint", truth)
    latents = torch.randn(truth.shape, generator=torch.Generator().manual_seed(3))
    kw = dict(num_images=16, num_inference_steps=8, latents=latents, config=DEFAULT_CONFIGS["inpaint"])
    plain = flowchef_sample(flow_pipe, task, **kw)
    filled = flowchef_sample(flow_pipe, task, propagate=inpainting_fill(task.operator), **kw)
    def quality(x):
        return psnr(to_unit_range(x), to_unit_range(truth)).mean()

    assert quality(filled) > quality(plain) + 1.0, (quality(filled), quality(plain))
    m = task.operator.mask
    assert float(((filled - truth) * m).abs().max()) < 0.05
    with pytest.raises(ValueError, match="`operator` must be an inpainting operator"):
        inpainting_fill(make_task("sr", truth).operator)
    with pytest.raises(ValueError, match=r"`images` of shape \(3, 1, 8, 8\) do not fit the mask"):
        inpainting_fill(task.operator, images=torch.zeros(3, 1, 8, 8))


def test_classifier_guidance_on_unconditional_run(flow_pipe):
    import fewstep
    from fewstep.pipelines.flowchef import DEFAULT_CONFIGS, flowchef_sample, make_task

    clf = fewstep.load_default("digits-classifier")
    labels = torch.arange(10)
    task = make_task("classifier", labels=labels, classifier=clf)
    x = flowchef_sample(flow_pipe, task, num_images=10, num_inference_steps=20,
                        generator=torch.Generator().manual_seed(0), config=DEFAULT_CONFIGS["classifier"])
    with torch.no_grad():
        acc = (clf(x.clamp(-1, 1)).argmax(1) == labels).float().mean()
    assert acc >= 0.8


def test_flowchef_pipeline_errors(flow_pipe):
    import fewstep
    from fewstep.pipelines.flowchef import dps_sample, flowchef_sample, make_task

    with pytest.raises(ValueError, match="steered_steps"):
        flowchef_sample(flow_pipe, _zero_cost, num_images=1, num_inference_steps=4,
                        config=FlowChefConfig(steered_steps=5))
    for gens in (2, 4):  # a shorter list failed with an IndexError in diffusers, a longer one was truncated
        with pytest.raises(ValueError, match=rf"`generator` is a list of {gens} generators, but the batch has 3"):
            flowchef_sample(flow_pipe, _zero_cost, class_labels=[1, 2, 3], num_inference_steps=2,
                            generator=[torch.Generator().manual_seed(i) for i in range(gens)])
    with pytest.raises(ValueError, match=r"`generator` must be a torch.Generator or a list of them"):
        flowchef_sample(flow_pipe, _zero_cost, num_images=1, num_inference_steps=2, generator=5)
    eps_pipe = fewstep.load_default("digits-eps", sampler="ddim")
    with pytest.raises(ValueError, match="rectified-flow"):
        flowchef_sample(eps_pipe, _zero_cost, num_images=1, num_inference_steps=4)
    with pytest.raises(ValueError, match="unknown FlowChef task"):
        make_task("colorize")
    with pytest.raises(ValueError, match="class ids"):
        make_task("classifier", labels=[3, 12], classifier=torch.nn.Identity())
    op = SuperResolution(2)
    with pytest.raises(ValueError, match="measurement shape"):
        dps_sample(flow_pipe, op, torch.zeros(1, 1, 16, 16), num_inference_steps=2)
    # one image per measurement (a lone image would be steered towards the mean of several), or one for all
    task = make_task("sr", torch.zeros(4, 1, 16, 16))
    for n in (1, 3):
        with pytest.raises(ValueError, match=rf"`num_images` \(or the latents' batch\) is {n}, but the 'sr' task "
                                             r"holds 4 measurements: pass num_images=4"):
            flowchef_sample(flow_pipe, task, num_images=n, num_inference_steps=2)
    shared = make_task("sr", torch.zeros(1, 1, 16, 16))
    assert flowchef_sample(flow_pipe, shared, num_images=2, num_inference_steps=1).shape == (2, 1, 16, 16)
    # sampling records no autograd graph (FlowChef needs no gradient through the model), steered or not
    before = next(flow_pipe.unet.parameters()).requires_grad
    flow_pipe.unet.requires_grad_(True)
    try:
        for cost in (None, shared):
            out = flowchef_sample(flow_pipe, cost, num_images=2, num_inference_steps=2)
            assert not out.requires_grad and out.grad_fn is None
    finally:
        flow_pipe.unet.requires_grad_(before)


def test_cli_flowchef(tmp_path, capsys):
    out = tmp_path / "sr.png"
    assert main(["generate", "--model", "digits-flow", "--task", "sr", "--steps", "6", "--num-images", "3",
                 "--quiet", "--out", str(out)]) == 0
    assert out.is_file() and "psnr" in capsys.readouterr().out
    bad = [
        ["--model", "digits-eps", "--task", "classifier"],  # not an inverse problem: no posterior sampling
        ["--model", "digits-flow", "--task", "inpaint", "--class", "3"],
        ["--model", "digits-flow", "--task", "sr", "--flowchef-steered-steps", "30"],
        ["--model", "digits-flow", "--task", "classifier", "--noise-std", "0.1"],
    ]
    for args in bad:
        assert main(["generate", *args, "--quiet", "--out", str(tmp_path / "x.png")]) == 2
        assert not (tmp_path / "x.png").exists()
    code = main(["generate", "--model", "digits-flow", "--task", "colorize"])
    assert code == 2
    capsys.readouterr()
    for argv, message in (
        (["--task", "motion-deblur"], "--task motion-deblur is a posterior-sampling task (--posterior dps|psld|stsl"),
        (["--task", "sr", "--sampler", "flowchef", "--sampler-option", "flowchef_step_size=0.2"],
         "--sampler-option flowchef_step_size: a FlowChef --task run is steered by --flowchef-step"),
    ):
        assert main(["generate", "--model", "digits-flow", *argv, "--quiet", "--out", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_cli_gaussian_fill(tmp_path, capsys, flow_pipe):
    out = tmp_path / "inpaint.png"
    psnrs = []
    for extra in ([], ["--gaussian-fill"]):
        assert main(["generate", "--model", "digits-flow", "--task", "inpaint", "--steps", "8", "--num-images", "10",
                     "--quiet", "--out", str(out), *extra]) == 0
        printed = capsys.readouterr().out
        assert ("FlowChef + Gaussian fill inpaint" in printed) == bool(extra)
        psnrs.append(float(printed.rsplit("psnr ", 1)[1].split(",")[0]))
    assert psnrs[1] > psnrs[0] + 1.0, psnrs
    for args in (["--model", "digits-flow", "--task", "sr"], ["--model", "digits-eps", "--task", "inpaint"],
                 ["--model", "digits-flow"]):
        assert main(["generate", *args, "--gaussian-fill", "--quiet", "--out", str(tmp_path / "x.png")]) == 2
        assert "--gaussian-fill is for FlowChef box inpainting: --model digits-flow --task inpaint" in (
            capsys.readouterr().err)
        assert not (tmp_path / "x.png").exists()
    from fewstep.pipelines.flowchef import run_task

    with pytest.raises(ValueError, match=r"`gaussian_fill` \(a bool\) applies to task 'inpaint' only, got True "
                                         r"for task 'sr'"):
        run_task(flow_pipe, "sr", num_images=2, steps=2, gaussian_fill=True)


def test_flowchef_scheduler_in_the_plain_pipeline_equals_the_hook(flow_pipe):
    from fewstep.datasets import load_digits_images
    from fewstep.pipelines.flowchef import flowchef_sample, make_task

    truth = load_digits_images(16, "test")[0][:4]
    task = make_task("sr", truth)
    latents = torch.randn(truth.shape, generator=torch.Generator().manual_seed(2))
    expected = flowchef_sample(flow_pipe, task, num_images=4, num_inference_steps=8, latents=latents,
                               config=FlowChefConfig(step_size=0.5, inner_steps=2))
    original = flow_pipe.scheduler
    sched = samplers.get("flowchef").from_config(original.config, flowchef_inner_steps=2)
    assert samplers.process_of("flowchef") == "flow"
    with pytest.raises(ValueError, match="set_cost"):
        sched.set_timesteps(8)
    sched.set_cost(task.cost)
    flow_pipe.scheduler = sched
    try:
        # guidance_scale 0 = the unconditional (null-class) output
        got = flow_pipe([0] * 4, num_inference_steps=8, guidance_scale=0.0, latents=latents, output_type="pt").images
        with pytest.raises(ValueError, match="steers by itself"):
            flowchef_sample(flow_pipe, task, num_images=4, num_inference_steps=8)
    finally:
        flow_pipe.scheduler = original
    torch.testing.assert_close(got, ((expected + 1) / 2).clamp(0, 1), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="flowchef_steered_steps|steered_steps"):
        samplers.get("flowchef")(flowchef_steered_steps=-2)


def test_cli_flowchef_restores_a_given_measurement(tmp_path, capsys):
    """--measurement with --task: each measured tile (here 8x8 for 2x SR of 16x16 digits) is restored, and the
    report gives the measurement residual instead of PSNR against an unknown ground truth."""
    import numpy as np
    from PIL import Image

    from fewstep.cli import main

    strip = tmp_path / "low.png"
    Image.fromarray((np.random.default_rng(0).random((8, 16)) * 255).astype("uint8")).save(strip)
    out = tmp_path / "restored.png"
    argv = ["generate", "--model", "digits-flow", "--task", "sr", "--measurement", str(strip), "--steps", "4",
            "--quiet", "--out", str(out)]
    assert main(argv) == 0 and out.is_file()
    assert "(2 images" in capsys.readouterr().out
    bad = tmp_path / "bad.png"
    Image.fromarray(np.zeros((10, 10), dtype="uint8")).save(bad)
    argv[argv.index(str(strip))] = str(bad)
    assert main(argv) == 2 and "multiples of 8" in capsys.readouterr().err
    argv = ["generate", "--model", "digits-flow", "--task", "classifier", "--measurement", str(strip), "--out",
            str(tmp_path / "c.png")]
    assert main(argv) == 2 and "not --task classifier" in capsys.readouterr().err


def test_masked_editing_keeps_the_source_outside_the_mask_and_follows_the_target_inside():
    """FlowChef editing on digits-flow (inversion-free): the keep region (a 2-pixel border) stays on the source
    image, and masked guidance towards the target class inside the mask beats no guidance on class accuracy."""
    import fewstep
    from fewstep.datasets import load_digits_images
    from fewstep.pipelines.flowchef import flowchef_edit
    from fewstep.solvers.flowchef import EditCost, masked_guidance

    pipe = fewstep.load_default("digits-flow", sampler="flow-euler")
    classifier = fewstep.load_default("digits-classifier")
    images, labels = load_digits_images(16, "test")
    src, src_l = images[:20], labels[:20]
    tgt_l = (src_l + 1) % 10
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 2:14, 2:14] = 1
    acc = {}
    for w in (0.0, 4.0):
        x = flowchef_edit(pipe, src, src_l, tgt_l, mask, num_inference_steps=12, guidance_scale=w,
                          generator=torch.Generator().manual_seed(0))
        keep_err = ((x - src) * (1 - mask)).pow(2).sum() / ((1 - mask).sum() * len(src))
        assert keep_err < 1e-4
        acc[w] = (classifier(x.clamp(-1, 1)).argmax(1) == tgt_l).float().mean().item()
    assert acc[4.0] > acc[0.0] and acc[4.0] >= 0.7, acc
    # the pieces: guidance only inside the mask; the cost covers the whole image for the first source steps
    v_t, v_s = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    m = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert masked_guidance(v_t, v_s, m, 3.0).flatten().tolist() == [4.0, 1.0, 1.0, 1.0]
    cost = EditCost(torch.zeros(1, 1, 2, 2), m, source_steps=1)
    x0 = torch.ones(1, 1, 2, 2)
    assert cost(x0).item() == 4.0
    cost.set_step(1)
    assert cost(x0).item() == 3.0
    with pytest.raises(ValueError, match="`mask` must lie in"):
        EditCost(torch.zeros(1, 1, 2, 2), m * 2, 0)
    with pytest.raises(ValueError, match="one source and one target label"):
        flowchef_edit(pipe, src, src_l[:3], tgt_l, mask)


def test_cli_edit_task_keeps_the_border_and_reports_target_accuracy(tmp_path, capsys):
    """``--task edit``: held-out digits (or ``--source`` tiles with ``--source-class``) are edited towards
    ``--class`` inside a centred square; the grid shows sources above edits, and the report gives the target-class
    accuracy and the change outside the mask (tiny: the keep-region cost pins it)."""
    from PIL import Image

    out = tmp_path / "edit.png"
    argv = ["generate", "--model", "digits-flow", "--task", "edit", "--steps", "4", "--num-images", "3", "--quiet",
            "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "3 edited images (top: source)" in text and "target_accuracy" in text
    keep_mse = float(text.split("keep_mse ")[1].rstrip(")\n"))
    assert keep_mse < 1e-3
    with Image.open(out) as img:  # two rows (sources, edits) of three cells
        assert abs(img.height / img.width - 2 / 3) < 0.05
    src = tmp_path / "src.png"
    Image.fromarray(np.zeros((16, 32), dtype="uint8")).save(src)
    argv = ["generate", "--model", "digits-flow", "--task", "edit", "--source", str(src), "--source-class", "1",
            "--class", "7", "--steps", "3", "--edit-size", "8", "--quiet", "--out", str(tmp_path / "e2.png")]
    assert main(argv) == 0 and "(2 edited images" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--source", "SRC"], "--source and --source-class go together"),
        (["--edit-size", "20"], "--edit-size must be <= 16"),
        (["--guidance-scale", "-1"], "--guidance-scale must be >= 0 for --task edit, got -1.0"),
        (["--measurement", "SRC"], "takes no --measurement"),
        (["--guidance", "apg"], "--guidance apg does not apply"),
        (["--posterior", "dps"], "--posterior are for posterior sampling, not --task edit"),
        (["--source", "BAD", "--source-class", "1"], "--source"),
    ],
)
def test_cli_edit_task_bad_input(tmp_path, capsys, extra, message):
    from PIL import Image

    src, bad = tmp_path / "src.png", tmp_path / "bad.png"
    Image.fromarray(np.zeros((16, 16), dtype="uint8")).save(src)
    Image.fromarray(np.zeros((10, 16), dtype="uint8")).save(bad)
    extra = [str(src) if e == "SRC" else str(bad) if e == "BAD" else e for e in extra]
    out = tmp_path / "x.png"
    assert main(["generate", "--model", "digits-flow", "--task", "edit", "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_edit_flags_need_the_edit_task(tmp_path, capsys):
    for argv in (["--model", "digits-eps", "--edit-size", "8"], ["--model", "digits-flow", "--task", "sr",
                                                                  "--source-class", "3"]):
        assert main(["generate", *argv, "--out", str(tmp_path / "x.png")]) == 2
        assert "only with --task edit" in capsys.readouterr().err
    assert main(["generate", "--model", "digits-flow", "--task", "sr", "--guidance-scale", "2", "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "--guidance-scale is for --task edit" in capsys.readouterr().err


def test_run_edit_validates_its_inputs():
    import fewstep
    from fewstep.pipelines.flowchef import central_mask, flowchef_edit, run_edit

    pipe = fewstep.load_default("digits-flow", sampler="flow-euler")
    mask = central_mask(16, 4)
    assert mask.sum() == 16 and mask[..., 6:10, 6:10].eq(1).all()
    with pytest.raises(ValueError, match="`edit_size` must be <= the image size 16, got 17"):
        central_mask(16, 17)
    with pytest.raises(ValueError, match="needs `source_classes`"):
        run_edit(pipe, source=torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"`source` must be N x 1 x 16 x 16 images, got \(2, 1, 8, 8\)"):
        run_edit(pipe, source=torch.zeros(2, 1, 8, 8), source_classes=[1])
    with pytest.raises(ValueError, match=r"`target_classes` must be class ids in 0..9, got \[12\]"):
        run_edit(pipe, num_images=2, target_classes=[12])
    with pytest.raises(ValueError, match="`guidance_scale` \\(w\\) must be a finite number >= 0, got -1"):
        flowchef_edit(pipe, torch.zeros(1, 1, 16, 16), [1], [2], mask, guidance_scale=-1)


def test_bench_matched_quality_needs_both_psnr_and_ssim():
    """scripts/bench_flowchef.py's matched-quality rule: the fastest FlowChef point at least as good as a DPS
    point in PSNR *and* SSIM, or none."""
    from _helpers import load_script

    bench = load_script("bench_flowchef")
    rows = [
        {"task": "sr", "method": "FlowChef", "nfe": 4, "psnr": 30.0, "ssim": 0.90, "ms_per_image": 5.0},
        {"task": "sr", "method": "FlowChef", "nfe": 8, "psnr": 32.0, "ssim": 0.99, "ms_per_image": 10.0},
        {"task": "sr", "method": "DPS", "nfe": 10, "psnr": 29.0, "ssim": 0.95, "ms_per_image": 40.0},
        {"task": "sr", "method": "DPS", "nfe": 20, "psnr": 33.0, "ssim": 0.98, "ms_per_image": 80.0},
        {"task": "deblur", "method": "DPS", "nfe": 10, "psnr": 1.0, "ssim": 0.1, "ms_per_image": 1.0},
    ]
    got = bench.matched(rows, "sr")
    assert [(m["dps_nfe"], m["flowchef_nfe"]) for m in got] == [(10, 8), (20, None)]
    assert got[0]["time_ratio"] == 0.25 and got[1]["time_ratio"] is None


def test_cli_edit_of_the_whole_image_reports_no_keep_error(tmp_path, capsys):
    """--edit-size 16 edits every pixel: nothing is kept, so no keep_mse (was printed as nan)."""
    out = tmp_path / "e.png"
    assert main(["generate", "--model", "digits-flow", "--task", "edit", "--edit-size", "16", "--steps", "2",
                 "--num-images", "1", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "target_accuracy" in printed and "keep_mse" not in printed and "nan" not in printed


@pytest.mark.parametrize("scale", [float("nan"), -1.0, "a"])
def test_costs_check_their_scale(scale):
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="`scale` must be a finite number >= 0"):
        measurement_cost(lambda v: v, x, scale=scale)
    with pytest.raises(ValueError, match="`scale` must be a finite number >= 0"):
        classifier_cost(lambda v: v.flatten(1), torch.zeros(2), scale=scale)
    with pytest.raises(ValueError, match="`scale` must be a finite number >= 0"):
        EditCost(x, torch.zeros(1, 1, 4, 4), 1, scale=scale)


def test_edit_cost_refuses_a_nan_mask():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 0, 0] = float("nan")
    with pytest.raises(ValueError, match="`mask` must lie in \\[0, 1\\]"):
        EditCost(torch.zeros(2, 1, 4, 4), mask, 1)


def test_masked_guidance_checks_a_number_scale():
    v = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="`scale` must be a finite number"):
        masked_guidance(v, v, v, float("nan"))


def test_flowchef_refuses_inference_mode_instead_of_not_steering():
    """Found by probing: under torch.inference_mode() enable_grad cannot run, the cost had no grad and FlowChef
    returned the unsteered sample without a word."""
    cfg = FlowChefConfig(step_size=0.5)
    x = torch.zeros(2, 1, 4, 4)
    cost = measurement_cost(lambda v: v, torch.ones(2, 1, 4, 4))
    with torch.inference_mode(), pytest.raises(ValueError, match="torch.inference_mode\\(\\) disables"):
        flowchef_update(x, torch.zeros_like(x), cost, cfg)
