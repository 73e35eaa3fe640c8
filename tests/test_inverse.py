"""Inverse problems: new operators, the Hutchinson trace estimator, DPS / PSLD / STSL on digits-eps and on a tiny
latent SD pipeline, the registry, the CLI and bad input."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from test_fewstep_pipeline import sd_path  # noqa: F401 - fixture

import fewstep
from fewstep import guidance
from fewstep.cli import main
from fewstep.datasets import held_out_digits
from fewstep.guidance import DPS, PSLD, STSL, InverseProblem, fd_hutchinson_trace
from fewstep.guidance.operators import (
    BoxInpainting,
    GaussianBlur,
    Inpainting,
    MotionBlur,
    SuperResolution,
    bicubic_weights,
    make_operator,
)
from fewstep.guidance.posterior import ddim_update, gluing_residual, measurement_residual
from fewstep.pipelines.posterior import posterior_sample, run_inverse_task


# ------------------------------------------------------------------------------------------------ operators
@pytest.mark.parametrize("op", [SuperResolution(2, mode="bicubic"), SuperResolution(4, mode="bicubic"),
                                MotionBlur(7, seed=1), MotionBlur(5, length=3.5, angle=30.0)], ids=repr)
def test_new_operators_are_adjoint(op):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randn(op.output_shape(x.shape), generator=g, dtype=torch.float64)
    lhs, rhs = (op(x) * y).sum(), (x * op.adjoint(y)).sum()
    assert abs(float(lhs - rhs)) < 1e-10 * max(1.0, abs(float(lhs)))


def test_bicubic_and_motion_kernels():
    w = bicubic_weights(16, 2)
    assert w.shape == (8, 16) and torch.allclose(w.sum(1), torch.ones(8, dtype=torch.float64))
    assert (w < 0).any()  # bicubic lobes, unlike average pooling
    const = torch.full((1, 1, 16, 16), 0.3)
    torch.testing.assert_close(make_operator("sr-bicubic", 16)(const), torch.full((1, 1, 8, 8), 0.3))
    m = MotionBlur(7, seed=4)
    assert math.isclose(float(m.kernel.sum()), 1.0, rel_tol=1e-6) and (m.kernel >= 0).all()
    assert MotionBlur(7, seed=4).angle == m.angle != MotionBlur(7, seed=5).angle
    assert not torch.allclose(m.kernel, m.kernel.flip(0))  # oriented: its mirror image is another streak
    # backproject undoes the operator's gain on a constant image (interior / observed pixels)
    for op in (SuperResolution(2), SuperResolution(2, mode="bicubic"), BoxInpainting(16, box=4)):
        back = op.backproject(op(const))
        inner = back[..., 4:12, 4:12] if not isinstance(op, Inpainting) else back[op.mask.expand_as(back) > 0]
        torch.testing.assert_close(inner, torch.full_like(inner, 0.3), atol=1e-5, rtol=0)


def test_operator_bad_input():
    with pytest.raises(ValueError, match="`mode` must be one of"):
        SuperResolution(2, mode="nearest")
    with pytest.raises(ValueError, match=r"`length` must be a finite number in \[1, 5\] \(the kernel size\), got 9"):
        MotionBlur(5, length=9)
    with pytest.raises(ValueError, match="`noise_std` must be a finite number >= 0, got -0.1"):
        GaussianBlur(noise_std=-0.1)
    with pytest.raises(ValueError, match="real .* got dtype torch.complex64"):
        Inpainting(torch.ones(1, 1, 4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="does not fit the mask"):
        Inpainting(torch.ones(1, 1, 8, 8))(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="unknown measurement task 'colorize'"):
        make_operator("colorize", 16)
    with pytest.raises(ValueError, match=r"`angle` \(degrees\) must be a finite number, got nan"):
        MotionBlur(5, angle=float("nan"))
    assert MotionBlur(5, angle=np.float32(30)).angle == 30.0  # numpy scalars are numbers too
    # a factor that does not divide the image: the same message from the measurement check as from the operator
    with pytest.raises(ValueError, match=r"sr: image size \(16, 16\) is not divisible by the factor 3"):
        SuperResolution(3).check_measurement(torch.zeros(1, 1, 5, 5), (1, 1, 16, 16))


# ------------------------------------------------------------------------------------------------ the math
def test_fd_hutchinson_trace_matches_exact_traces():
    g = torch.Generator().manual_seed(0)
    d = 12
    diag = torch.randn(d, generator=g, dtype=torch.float64)
    x = torch.randn(3, d, generator=g, dtype=torch.float64)
    rademacher = (torch.randint(0, 2, (1, 3, d), generator=g) * 2 - 1).double()
    # a diagonal linear map: one Rademacher probe is exact, at any finite-difference step
    got = fd_hutchinson_trace(lambda v: v * diag, x, rademacher, delta=0.7)
    torch.testing.assert_close(got, diag.sum().expand(3))
    # a dense linear map with Gaussian probes: unbiased, converges to the exact trace
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    probes = torch.randn(4000, 3, d, generator=g, dtype=torch.float64)
    got = fd_hutchinson_trace(lambda v: v @ m.T, x, probes, delta=1.0)
    assert torch.allclose(got, torch.trace(m).expand(3), atol=0.1 * m.abs().sum().sqrt())
    # a nonlinear analytic map: Tr J of tanh(v) is sum(1 - tanh^2), first order in delta
    probes = torch.randn(4000, 3, d, generator=g, dtype=torch.float64)
    exact = (1 - torch.tanh(x) ** 2).sum(1)
    got = fd_hutchinson_trace(torch.tanh, x, probes, delta=1e-4)
    assert torch.allclose(got, exact, atol=0.35)  # probe noise (~6 sigma)
    # the same probes' exact-Jacobian estimate mean_p sum_j xi^2 tanh'(x); the finite difference differs from it by
    # delta/2 mean_p sum_j xi^3 tanh''(c) (Taylor), at most delta/2 max|tanh''| mean_p sum_j |xi|^3 = 7e-4
    # (measured 1e-5; dividing by P - 1 instead of P is 1.5e-3 off)
    same_probes = (probes**2 * (1 - torch.tanh(x) ** 2)).sum(-1).mean(0)
    bound = 1e-4 / 2 * (4 / (3 * 3**0.5)) * probes.abs().pow(3).sum(-1).mean(0)
    assert ((got - same_probes).abs() <= bound).all()


def test_fd_hutchinson_trace_needs_a_square_map():
    x = torch.zeros(2, 4)
    probes = torch.ones(1, 2, 4)
    with pytest.raises(ValueError, match=r"`fn\(x\)` must have the shape of `x` \(2, 4\) \(the trace needs a square "
                       r"Jacobian\), got \(2, 3\)"):
        fd_hutchinson_trace(lambda v: v[:, :3], x, probes)
    with pytest.raises(TypeError, match=r"`fn\(x\)` must be a tensor of `x`.s shape \(2, 4\), got float"):
        fd_hutchinson_trace(lambda v: 1.0, x, probes)


def test_stsl_trace_term_of_a_gaussian_prior_is_exact():
    """For data N(0, v I) under VP the exact eps is sigma x / (alpha^2 v + sigma^2): the STSL trace term's gradient
    vanishes (constant trace) and probe batching gives the same gradient as one batched call."""
    v, d = 0.5, 16

    def model_fn(z, i):
        a, s = 0.6, 0.8
        eps = s * z / (a * a * v + s * s)
        return (z - s * eps) / a, eps

    op = BoxInpainting(4, box=2)
    y = torch.zeros(2, 1, 4, 4)
    problem = InverseProblem(op, y)
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    grads = []
    for batch in (None, 1):
        m = STSL(eta=1.0, num_probes=3, probe_batch=batch)
        grad, evals, _ = m._inner_grad(model_fn, problem, z, 0, 0.6, 0.8, torch.Generator().manual_seed(2))
        grads.append(grad)
        assert evals == 4
    torch.testing.assert_close(grads[0], grads[1])
    first = STSL(eta=0.0)._inner_grad(model_fn, problem, z, 0, 0.6, 0.8, None)[0]
    torch.testing.assert_close(grads[0], first, atol=1e-5, rtol=1e-5)
    assert d == z[0].numel()



def _toy_model(a: float = 0.6, s: float = 0.8):
    """A nonlinear denoiser ``eps(z) = tanh(z) + 0.1 z^2`` at one level ``(a, s)`` (counts its calls)."""
    calls = []

    def model_fn(z, i):
        calls.append(z.shape[0])
        eps = torch.tanh(z) + 0.1 * z * z
        return (z - s * eps) / a, eps

    return model_fn, calls


def test_stsl_trace_weight_scales_only_the_trace_term():
    """``trace_weight="tweedie"`` multiplies the trace term's gradient by sigma^4 / alpha^2 (the weight of
    Tr(grad s) in Tr Cov[z0 | z_t]); the measurement gradient is unchanged."""
    a, s = 0.6, 0.8
    model_fn, _ = _toy_model(a, s)
    problem = InverseProblem(BoxInpainting(4, box=2), torch.zeros(2, 1, 4, 4))
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = {}
    for weight in ("constant", "tweedie"):
        m = STSL(eta=0.5, trace_weight=weight)
        grads[weight] = m._inner_grad(model_fn, problem, z, 0, a, s, torch.Generator().manual_seed(2))[0]
    base = STSL(eta=0.0)._inner_grad(model_fn, problem, z, 0, a, s, None)[0]
    trace_part = grads["constant"] - base
    assert float(trace_part.abs().max()) > 1e-4  # the term acts on this nonlinear model
    torch.testing.assert_close(grads["tweedie"] - base, trace_part * s**4 / a**2)
    assert STSL(eta=2.0, trace_weight="tweedie").trace_scale(0.5, 0.5) == pytest.approx(2.0 * 0.5**4 / 0.5**2)
    assert STSL(eta=2.0).trace_scale(0.5, 0.5) == 2.0



def test_stsl_trace_sigma_min_skips_probes_at_low_noise():
    """Below ``trace_sigma_min`` the trace term (and its probe evaluations) is off: the first-order gradient, one
    evaluation; NFE counts only the probes actually evaluated."""
    a, s = 0.6, 0.8
    problem = InverseProblem(BoxInpainting(4, box=2), torch.zeros(2, 1, 4, 4))
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model_fn, calls = _toy_model(a, s)
    off = STSL(eta=0.5, num_probes=2, trace_sigma_min=0.81)._inner_grad(model_fn, problem, z, 0, a, s, None)
    on = STSL(eta=0.5, num_probes=2, trace_sigma_min=0.8)._inner_grad(model_fn, problem, z, 0, a, s,
                                                                         torch.Generator().manual_seed(2))
    first = STSL(eta=0.0)._inner_grad(model_fn, problem, z, 0, a, s, None)
    assert off[1] == 1 and on[1] == 3
    torch.testing.assert_close(off[0], first[0])
    assert not torch.allclose(on[0], first[0])
    # a two-level grid, sigma 0.8 then 0.5: probes only at the first level
    model_fn, calls = _toy_model(a, s)
    res = STSL(eta=0.5, num_probes=2, inner_steps=1, init="noise", trace_sigma_min=0.6).sample(
        model_fn, problem, z, [0.6, 0.87, 1.0], [0.8, 0.5, 0.0], torch.Generator().manual_seed(0))
    assert res.nfe == res.grad_evals == 3 + 1 and sum(calls) == 2 * (3 + 1)

def test_stsl_reuse_eval_is_a_ddim_step_from_the_refined_point():
    """``reuse_eval=True``: the DDIM step uses the last inner evaluation's eps at the refined point (no extra call),
    i.e. DDIM(z) - (alpha'/alpha) zeta grad; ``reuse_eval=False`` evaluates the model again there."""
    a, s, a_n, s_n = 0.6, 0.8, 0.8, 0.6
    problem = InverseProblem(BoxInpainting(4, box=2), torch.full((2, 1, 4, 4), 0.3, dtype=torch.float64))
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = {}
    for reuse in (True, False):
        model_fn, calls = _toy_model(a, s)
        m = STSL(eta=0.0, inner_steps=1, step_size=0.7, init="noise", reuse_eval=reuse)
        res = m.sample(model_fn, problem, z, [a, a_n], [s, s_n])
        assert res.nfe == len(calls) == (1 if reuse else 2) and res.grad_evals == 1
        outs[reuse] = res.sample
    model_fn, _ = _toy_model(a, s)
    z0, eps = model_fn(z, 0)
    grad = STSL(eta=0.0)._inner_grad(model_fn, problem, z, 0, a, s, None)[0]
    expected = ddim_update(z0, eps, a, s, a_n, s_n) - (a_n / a) * 0.7 * grad
    torch.testing.assert_close(outs[True], expected)
    assert not torch.allclose(outs[True], outs[False])

def test_ddim_update():
    z0, eps = torch.ones(1, 4), torch.full((1, 4), 2.0)
    a, s, a_n, s_n = 0.6, 0.8, 0.8, 0.6
    torch.testing.assert_close(ddim_update(z0, eps, a, s, a_n, s_n), a_n * z0 + s_n * eps)
    noise = torch.zeros(1, 4)
    c = s_n / s * math.sqrt(1 - (a / a_n) ** 2)
    out = ddim_update(z0, eps, a, s, a_n, s_n, 1.0, noise)
    torch.testing.assert_close(out, a_n * z0 + math.sqrt(s_n**2 - c**2) * eps)
    with pytest.raises(ValueError, match="`noise` is needed"):
        ddim_update(z0, eps, a, s, a_n, s_n, 1.0)
    torch.testing.assert_close(ddim_update(z0, eps, a, s, 1.0, 0.0, 1.0), z0)  # the last step lands on z0


def test_gluing_term():
    op = BoxInpainting(8, box=4)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    problem = InverseProblem(op, op(x))
    assert float(gluing_residual(problem, x, x).abs().max()) < 1e-6  # consistent with y: nothing to glue
    other = x + 1.0
    assert float(gluing_residual(problem, other, other).min()) > 1.0
    torch.testing.assert_close(measurement_residual(problem, x), torch.zeros(2))
    # pixel space (D = E = I): the gluing residual is ||A^T (y - A x)||, here for a non-projection A (2x SR)
    sr = SuperResolution(2)
    y = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = sr.adjoint(y - sr(x)).flatten(1).norm(dim=1)
    torch.testing.assert_close(gluing_residual(InverseProblem(sr, y), x, x), expected)


# ------------------------------------------------------------------------------------------------ methods, registry
def test_registry_and_validation():
    assert guidance.names("posterior") == ["dps", "psld", "stsl"] and guidance.names() == ["cfg", "cfg++", "apg"]
    assert guidance.get("stsl") is STSL and guidance.get("psld") is PSLD and guidance.is_posterior("dps")
    with pytest.raises(ValueError, match="'stsl' is an inverse-problem posterior sampler"):
        guidance.make("stsl", 1.0)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        guidance.names("sampler")
    assert STSL().evaluations_per_step() == 5 * 2 and STSL(eta=0).evaluations_per_step() == 5
    assert STSL(reuse_eval=False).evaluations_per_step() == 5 * 2 + 1
    assert PSLD().gluing == 0.1 and DPS().gluing == 0.0 and STSL().gluing == 0.0
    for kwargs, match in [({"eta": -0.1}, "`eta` must be a finite number >= 0"),
                          ({"inner_steps": 0}, "`inner_steps` must be an integer"),
                          ({"inner_steps": True}, "`inner_steps` must be an integer"),
                          ({"num_probes": 1.5}, "`num_probes`"), ({"probe_scale": 0.0}, "`probe_scale`"),
                          ({"strength": 0.0}, "`strength`"), ({"init": "zeros"}, "`init` must be one of"),
                          ({"ddim_eta": 2.0}, "`ddim_eta`"), ({"loss": "l1"}, "`loss` must be one of"),
                          ({"reuse_eval": 1}, "`reuse_eval` must be True or False, got 1"),
                          ({"trace_sigma_min": -1.0}, "`trace_sigma_min` must be"),
                          ({"trace_weight": "linear"},
                           r"`trace_weight` must be one of \['constant', 'tweedie'\], got 'linear'")]:
        with pytest.raises(ValueError, match=match):
            STSL(**kwargs)
    with pytest.raises(ValueError, match="needs init='adjoint'"):
        DPS(strength=0.5)


@pytest.fixture(scope="module")
def eps_pipe():
    return fewstep.load_default("digits-eps")


def test_dps_and_stsl_reduce_the_measurement_error(eps_pipe):
    n = 4
    results = {}
    for name, method, steps in [("none", DPS(step_size=0.0), 6), ("dps", DPS(step_size=2.0), 6),
                                ("stsl", STSL(step_size=2.0, inner_steps=2, strength=0.6), 3)]:
        r = run_inverse_task(eps_pipe, "sr", method, num_images=n, steps=steps, seed=0)
        op = make_operator("sr", 16)
        y = op.measure(r.truth, torch.Generator().manual_seed(1))
        results[name] = float(measurement_residual(InverseProblem(op, y), r.images).mean())
        assert r.images.shape == (n, 1, 16, 16) and set(r.metrics) == {"psnr", "ssim", "accuracy"}
        if name == "stsl":
            assert r.nfe == 3 * 2 * 2
    assert results["dps"] < 0.6 * results["none"] and results["stsl"] < 0.3 * results["none"]


def test_posterior_bad_input(eps_pipe):
    op = make_operator("sr", 16)
    with pytest.raises(ValueError, match=r"measurement shape \(2, 1, 16, 16\) does not match the operator's output"):
        posterior_sample(eps_pipe, op, torch.zeros(2, 1, 16, 16), "dps", 2)
    with pytest.raises(ValueError, match="unknown inverse task 'colorize'"):
        run_inverse_task(eps_pipe, "colorize", "dps")
    with pytest.raises(ValueError, match="unknown posterior method 'ddrm'"):
        posterior_sample(eps_pipe, op, torch.zeros(2, 1, 8, 8), "ddrm", 2)
    flow = fewstep.load_default("digits-flow", sampler="flow-euler")
    with pytest.raises(ValueError, match="needs a VP diffusion model; .* flow-matching model"):
        posterior_sample(flow, op, torch.zeros(2, 1, 8, 8), "stsl", 2)


@pytest.mark.parametrize("method", [DPS(step_size=1.0, ddim_eta=1.0), STSL(step_size=1.0, inner_steps=1)])
def test_posterior_sample_takes_one_generator_per_image(eps_pipe, method):
    """With a list of generators image n is the image sampled alone with generator n (its initial noise, DPS's DDIM
    noise and STSL's trace probes all come from its own generator), as in diffusers. One generator drew the whole
    batch's noise and a list crashed inside torch."""
    op = make_operator("inpaint", 16)
    truth, _ = held_out_digits(2, 16, 0)
    y = op.measure(truth)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = posterior_sample(eps_pipe, op, y, method, 2, generator=gens(3, 4)).images
    alone = posterior_sample(eps_pipe, op, y[1:], method, 2, generator=gens(4)).images
    other = posterior_sample(eps_pipe, op, y[1:], method, 2, generator=gens(3)).images
    torch.testing.assert_close(both[1:], alone, atol=5e-3, rtol=0)  # batched convolutions: ~1e-5 per call
    assert (other - alone).abs().max() > 0.05
    for bad, msg in [(gens(1), r"a list of 1 generators, but the batch has 2 images"),
                     (5, r"`generator` must be a torch.Generator or a list of them \(one per image\), got int 5")]:
        with pytest.raises(ValueError, match=msg):
            posterior_sample(eps_pipe, op, y, method, 2, generator=bad)


# ------------------------------------------------------------------------------------------------ latent SD path
@pytest.fixture(scope="module")
def tiny_sd(sd_path):  # noqa: F811 - the tiny SD pipeline directory of test_fewstep_pipeline
    loaded = StableDiffusionPipeline.from_pretrained(sd_path)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def test_latent_sd_path_runs_end_to_end(tiny_sd):
    op = SuperResolution(2)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = op.measure(x)
    outs = {}
    for name, method in [("stsl", STSL(inner_steps=1, num_probes=2, probe_batch=1, strength=0.5)),
                         ("stsl-glued", STSL(inner_steps=1, num_probes=2, probe_batch=1, strength=0.5, gluing=0.5)),
                         ("psld", PSLD(step_size=0.5)), ("dps", DPS(step_size=0.5))]:
        out = posterior_sample(tiny_sd, op, y, method, num_inference_steps=2,
                               generator=torch.Generator().manual_seed(3), prompt="a digit")
        assert out.images.shape == (2, 3, 8, 8) and out.latents.shape == (2, 4, 8, 8)
        assert torch.isfinite(out.images).all()
        outs[name] = out
    assert outs["stsl"].nfe == 2 * 3 and outs["stsl"].grad_evals == 2 * 3 and outs["dps"].nfe == 2
    assert not torch.allclose(outs["psld"].latents, outs["dps"].latents)  # the gluing term acts
    assert not torch.allclose(outs["stsl"].latents, outs["stsl-glued"].latents)


def test_latent_sd_path_runs_a_half_precision_pipeline(sd_path):  # noqa: F811 - the imported fixture
    """The solver keeps float32 latents for a bf16/fp16 pipeline; the VAE decode/encode inside the measurement
    term must run in the VAE's dtype (crashed with a dtype mismatch)."""
    pipe = StableDiffusionPipeline.from_pretrained(sd_path, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    op = SuperResolution(2)
    y = op.measure(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    for method in (DPS(step_size=0.5), STSL(inner_steps=1, num_probes=1, probe_batch=1, strength=0.5)):
        out = posterior_sample(pipe, op, y, method, num_inference_steps=2, generator=torch.Generator().manual_seed(3))
        assert out.latents.dtype == torch.float32 and torch.isfinite(out.images).all()
    assert pipe.vae.dtype == pipe.unet.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_posterior(tmp_path, capsys):
    out = tmp_path / "r.png"
    code = main(["generate", "--model", "digits-eps", "--task", "inpaint", "--posterior", "stsl", "--steps", "2",
                 "--stsl-inner-steps", "1", "--num-images", "2", "--out", str(out), "--quiet"])
    assert code == 0 and out.is_file()
    assert "stsl inpaint" in capsys.readouterr().out
    from PIL import Image

    low = tmp_path / "low.png"  # two 8x8 low-resolution digits side by side: the measurement of 2x SR
    Image.fromarray((torch.rand(8, 16, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(low)
    code = main(["generate", "--task", "sr", "--posterior", "dps", "--steps", "2", "--measurement", str(low),
                 "--out", str(out), "--quiet"])
    assert code == 0 and "2 restored images" in capsys.readouterr().out
    # the file sets the number of images: a different --num-images is refused, not ignored
    code = main(["generate", "--task", "sr", "--posterior", "dps", "--steps", "2", "--measurement", str(low),
                 "--num-images", "3", "--out", str(tmp_path / "n.png"), "--quiet"])
    assert code == 2 and "--num-images 3: --measurement holds 2 image(s)" in capsys.readouterr().err
    assert not (tmp_path / "n.png").exists()
    bad = [
        (["--model", "digits-flow", "--task", "sr", "--posterior", "dps"], "needs a VP diffusion model"),
        (["--task", "sr", "--posterior", "dps", "--stsl-eta", "0.1"], "--stsl-eta apply to --posterior stsl"),
        (["--posterior", "dps"], "need --task"),
        (["--task", "classifier", "--posterior", "stsl"], "not an inverse problem"),
        (["--task", "sr", "--strength", "1.5"], "`strength` must be a finite number in (0, 1]"),
        (["--task", "sr", "--measurement", "missing.png"], "no such file"),
        # an explicit --guidance, even the default rule's name, would be ignored: refused
        (["--task", "sr", "--guidance", "cfg"], "--guidance do not apply to posterior sampling"),
        (["--model", "digits-flow", "--task", "sr", "--guidance", "cfg"], "--guidance cfg does not apply to FlowChef"),
    ]
    for args, match in bad:
        assert main(["generate", *args, "--out", str(tmp_path / "x.png"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
        assert not (tmp_path / "x.png").exists()
    code = main(["generate", "--guidance", "stsl", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "posterior sampler" in capsys.readouterr().err


def test_ddim_update_checks_its_levels_and_eta():
    """Found by probing: ddim_eta = NaN silently dropped the eps term (0.8 instead of 1.4), ddim_eta = -1 shrank it
    and a negative sigma_next was taken."""
    z0, eps = torch.ones(1), torch.ones(1)
    torch.testing.assert_close(ddim_update(z0, eps, 0.5, 0.8, 0.8, 0.6), torch.tensor([1.4]))
    for eta in (float("nan"), -1.0, math.inf, "0"):
        with pytest.raises(ValueError, match=r"`ddim_eta` must be a finite number >= 0, got"):
            ddim_update(z0, eps, 0.5, 0.8, 0.8, 0.6, ddim_eta=eta)
    for i, name in enumerate(("alpha", "sigma", "alpha_next", "sigma_next")):
        for bad in (-0.6, float("nan"), math.inf):
            levels = [0.5, 0.8, 0.8, 0.6]
            levels[i] = bad
            with pytest.raises(ValueError, match=rf"`{name}` must be a finite number >= 0, got"):
                ddim_update(z0, eps, *levels)
    # numpy scalars are numbers too; the final clean level (sigma_next = 0) is still allowed
    torch.testing.assert_close(ddim_update(z0, eps, np.float32(0.5), 0.8, 1.0, np.float64(0.0)), z0)


def test_first_order_loss_checks_loss_and_gluing():
    """Found by probing: loss="l1" silently computed the "norm" loss and gluing = NaN returned NaN."""
    from fewstep.guidance.posterior import first_order_loss

    op = BoxInpainting(8, 3)
    problem = InverseProblem(op, op(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))))
    z = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"`loss` must be one of \['norm', 'squared'\], got 'l1'"):
        first_order_loss(problem, z, loss="l1")
    for gluing in (float("nan"), -1.0, "1"):
        with pytest.raises(ValueError, match=r"`gluing` must be a finite number >= 0, got"):
            first_order_loss(problem, z, gluing=gluing)
    with pytest.raises(TypeError, match=r"`problem` must be an InverseProblem, got BoxInpainting"):
        first_order_loss(op, z)
    norm = first_order_loss(problem, z)
    torch.testing.assert_close(first_order_loss(problem, z, loss="squared"), 0.5 * norm**2)


def _np_repr(value: int) -> str:
    """The message's text for ``np.int64(value)`` (numpy 2: ``np.int64(4)``; numpy 1: ``4``), as a regex."""
    return re.escape(repr(np.int64(value)))


def test_operators_and_stsl_take_numpy_scalars():
    """Found by probing: numpy scalars were refused with self-contradictory messages ("must be an integer >= 2, got
    np.int64(2)"); they are accepted and stored as Python int/float."""
    from fewstep.guidance.operators import RandomInpainting

    sr = SuperResolution(np.int64(2))
    assert sr.factor == 2 and type(sr.factor) is int
    assert sr(torch.zeros(1, 1, 8, 8)).shape == (1, 1, 4, 4)
    box = BoxInpainting(8, np.int64(3), top=np.int64(1))
    assert box.box == (1, 2, 3) and all(type(v) is int for v in box.box)
    torch.testing.assert_close(box.mask, BoxInpainting(8, 3, top=1).mask)
    blur = GaussianBlur(np.int64(5), np.float32(1.0))
    assert blur.kernel_size == 5 and type(blur.kernel_size) is int
    torch.testing.assert_close(blur.kernel, GaussianBlur(5, 1.0).kernel)
    assert MotionBlur(np.int64(5), length=np.float32(3.0), angle=10.0).length == 3.0
    torch.testing.assert_close(RandomInpainting(8, np.float32(0.5)).mask, RandomInpainting(8, 0.5).mask)
    stsl = STSL(inner_steps=np.int64(2), num_probes=np.int32(1), probe_batch=np.int64(1))
    assert (stsl.inner_steps, stsl.num_probes, stsl.probe_batch) == (2, 1, 1) and type(stsl.inner_steps) is int
    # and what is still refused says what is allowed
    for make, match in (
        (lambda: RandomInpainting(8, 1.0), r"`drop` must be a finite number in \[0, 1\), got 1\.0"),
        (lambda: RandomInpainting(8, float("nan")), r"`drop` must be a finite number in \[0, 1\), got nan"),
        (lambda: GaussianBlur(np.int64(4)), r"`kernel_size` must be an odd integer >= 1, got " + _np_repr(4)),
        (lambda: GaussianBlur(5, np.float32(0.0)), r"`blur_sigma` must be a finite number > 0, got"),
        (lambda: BoxInpainting(8, np.int64(8)), r"`box` must be smaller than the image size 8, got 8"),
        (lambda: SuperResolution(np.int64(1)), r"`factor` must be an integer >= 2, got " + _np_repr(1)),
        (lambda: MotionBlur(5, length=True), r"`length` must be a finite number in \[1, 5\] \(the kernel size\)"),
    ):
        with pytest.raises(ValueError, match=match):
            make()


def test_posterior_sampling_keeps_the_callers_parameter_flags_and_refuses_inference_mode():
    """Found by probing: posterior sampling set requires_grad=False on the caller's UNet for good (a later fine-tune
    got no gradients); under torch.inference_mode() it failed with autograd's "does not require grad"."""
    pipe = fewstep.load_default("digits-eps")
    op = make_operator("inpaint", size=16)
    y = op(torch.zeros(1, 1, 16, 16))
    pipe.unet.requires_grad_(True)
    next(pipe.unet.parameters()).requires_grad_(False)  # a mix of flags comes back as it was
    before = [p.requires_grad for p in pipe.unet.parameters()]
    posterior_sample(pipe, op, y, "dps", 2, generator=torch.Generator().manual_seed(0))
    assert [p.requires_grad for p in pipe.unet.parameters()] == before
    with torch.inference_mode(), pytest.raises(ValueError, match="torch.inference_mode\\(\\) disables"):
        posterior_sample(pipe, op, y, "dps", 2)
    with torch.no_grad():  # fine: the gradient steps enable grad locally
        assert posterior_sample(pipe, op, y, "dps", 2).images.shape == (1, 1, 16, 16)
