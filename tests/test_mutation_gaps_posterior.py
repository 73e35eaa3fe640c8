"""Gaps a mutation probe of the measurement operators, DPS/PSLD/STSL and the posterior pipeline found, closed against
independent references: each operator's explicit matrix (the operator applied to the identity basis) for adjoints and
back-projection, ``numpy.linalg.pinv`` for the pseudo-inverse, torch's antialiased bicubic resize, scipy's Gaussian
window and 2-D convolution, the motion streak rasterised by hand from its docstring, DDIM/DDPM steps written out from
Song et al. eq. 12 and diffusers' ``DDIMScheduler`` time grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F

from fewstep.guidance import DPS, STSL, InverseProblem
from fewstep.guidance.operators import (
    BoxInpainting,
    GaussianBlur,
    MotionBlur,
    RandomInpainting,
    SuperResolution,
    make_operator,
)
from fewstep.guidance.posterior import PosteriorMethod, PosteriorResult, ddim_update


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _matrix(op, shape) -> np.ndarray:
    """The operator as an explicit ``[m, n]`` matrix: column ``j`` is ``A e_j``."""
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:])
    return op(basis).reshape(n, -1).T.numpy()


# (operator, image shape): non-square images where the operator allows them, two channels (per-channel operators)
MATRIX_CASES = [
    (BoxInpainting(6, box=2, top=1, left=3), (1, 2, 6, 6)),
    (RandomInpainting(6, drop=0.5, seed=1), (1, 2, 6, 6)),
    (SuperResolution(2), (1, 2, 4, 6)),
    (SuperResolution(2, mode="bicubic"), (1, 2, 4, 6)),
    (SuperResolution(3, mode="bicubic"), (1, 1, 6, 9)),
    (GaussianBlur(3, 0.8), (1, 2, 5, 6)),
    (MotionBlur(5, angle=30.0), (1, 2, 5, 6)),
]


@pytest.mark.parametrize("op,shape", MATRIX_CASES, ids=lambda v: repr(v) if not isinstance(v, tuple) else str(v))
def test_adjoint_and_backproject_match_the_explicit_matrix(op, shape):
    """``adjoint(y) = A^T y`` and ``backproject(y) = A^T y / (A^T A 1)`` (0 where that vanishes) with ``A`` built
    column by column; float64 throughout, so 1e-12 is rounding only."""
    a = _matrix(op, shape)
    out_shape = op.output_shape(shape)
    y = _randn(*out_shape, seed=1)
    torch.testing.assert_close(op.adjoint(y).reshape(-1).numpy(), a.T @ y.reshape(-1).numpy(), rtol=0, atol=1e-12)
    gain = a.T @ (a @ np.ones(a.shape[1]))
    back = np.where(np.abs(gain) > 1e-8, a.T @ y.reshape(-1).numpy() / np.where(gain == 0, 1, gain), 0.0)
    torch.testing.assert_close(op.backproject(y).reshape(-1).numpy(), back, rtol=0, atol=1e-12)


@pytest.mark.parametrize("op,shape", MATRIX_CASES[:3], ids=lambda v: repr(v) if not isinstance(v, tuple) else str(v))
def test_backproject_is_the_pseudo_inverse_where_a_at_is_diagonal(op, shape):
    """For masks and average pooling ``A A^T`` is diagonal, and ``backproject`` is exactly the Moore-Penrose
    pseudo-inverse ``A^+`` (``numpy.linalg.pinv``): ``A^+ y`` and ``A A^+ A = A`` (no NaN on unobserved pixels)."""
    a = _matrix(op, shape)
    pinv = np.linalg.pinv(a)
    y = _randn(*op.output_shape(shape), seed=2)
    got = op.backproject(y).reshape(-1).numpy()
    torch.testing.assert_close(got, pinv @ y.reshape(-1).numpy(), rtol=0, atol=1e-10)  # pinv's SVD: ~1e-15
    x = _randn(*shape, seed=3)
    torch.testing.assert_close(op(op.backproject(op(x))), op(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("factor,h,w", [(2, 8, 12), (3, 9, 12), (4, 16, 8)])
def test_bicubic_sr_matches_torchs_antialiased_bicubic(factor, h, w):
    """``mode="bicubic"`` is PIL/Matlab antialiased bicubic (Keys a = -0.5, kernel stretched by the factor, edge
    weights renormalised): torch's ``F.interpolate(..., antialias=True)`` implements the same, to float64 rounding."""
    x = _randn(2, 2, h, w, seed=4)
    ref = F.interpolate(x, size=(h // factor, w // factor), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(SuperResolution(factor, mode="bicubic")(x), ref, rtol=0, atol=1e-12)
    if factor == 2:  # the task's default is this operator
        torch.testing.assert_close(make_operator("sr-bicubic", h)(x[..., :h]), F.interpolate(
            x[..., :h], size=(h // 2, h // 2), mode="bicubic", antialias=True, align_corners=False), rtol=0, atol=1e-12)


def _scipy_gaussian(k: int, std: float) -> np.ndarray:
    g = scipy.signal.windows.gaussian(k, std=std)
    k2 = np.outer(g, g)
    return k2 / k2.sum()


@pytest.mark.parametrize("k,std", [(5, 1.0), (7, 2.0), (3, 0.5)])
def test_gaussian_blur_matches_scipy(k, std):
    """The kernel is scipy's normalised Gaussian window (the float32 kernel: 1e-7), and the operator is the zero-padded
    'same' 2-D convolution of each channel (``scipy.signal.convolve2d``)."""
    op = GaussianBlur(k, std)
    ref = _scipy_gaussian(k, std)
    np.testing.assert_allclose(op.kernel.double().numpy(), ref, rtol=0, atol=1e-7)
    x = _randn(1, 2, 7, 9, seed=5)
    got = op(x).numpy()
    for c in range(2):
        np.testing.assert_allclose(got[0, c], scipy.signal.convolve2d(x[0, c].numpy(), ref, mode="same"), atol=1e-6)
    # the deblur task's default: 5x5, std 1 (README / make_operator's docstring)
    np.testing.assert_allclose(make_operator("deblur", 16).kernel.double().numpy(), _scipy_gaussian(5, 1.0), atol=1e-7)


def _streak(k: int, length: float, angle: float) -> np.ndarray:
    """The docstring's motion streak, by hand: ``max(2, int(8 length))`` evenly spaced points on a segment of
    ``length - 1`` pixels (end point to end point) through the kernel centre at ``angle`` degrees counter-clockwise
    from the x axis (image rows grow downwards), each splatted bilinearly on its 4 neighbours; sum 1."""
    c = k // 2
    out = np.zeros((k, k))
    n = max(2, int(8 * length))
    for j in range(n):
        s = (-0.5 + j / (n - 1)) * (length - 1)
        x, y = c + s * math.cos(math.radians(angle)), c - s * math.sin(math.radians(angle))
        x0, y0 = math.floor(x), math.floor(y)
        for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                if 0 <= xi < k and 0 <= yi < k:
                    out[yi, xi] += wx * wy
    return out / out.sum()


@pytest.mark.parametrize("k,length,angle", [(7, 7.0, 0.0), (7, 7.0, 45.0), (5, 3.5, 30.0), (9, 6.0, 117.0),
                                            (7, 4.0, 90.0)])
def test_motion_blur_matches_the_hand_rasterised_streak(k, length, angle):
    """Kernel against the streak rasterised by hand (float32 kernel: 1e-7); the operator is a true 2-D convolution
    with it (``scipy.signal.convolve2d``, zero padded)."""
    op = MotionBlur(k, length=length, angle=angle)
    ref = _streak(k, length, angle)
    np.testing.assert_allclose(op.kernel.double().numpy(), ref, rtol=0, atol=1e-7)
    if angle == 0.0:  # a horizontal streak lies on the centre row
        assert (ref[np.arange(k) != k // 2] == 0).all()
    x = _randn(1, 2, 8, 9, seed=6)
    got = op(x).numpy()
    for c in range(2):
        np.testing.assert_allclose(got[0, c], scipy.signal.convolve2d(x[0, c].numpy(), ref, mode="same"), atol=1e-6)


def test_inpainting_masks_are_where_they_are_asked_to_be():
    """Box: zeros exactly on rows ``top..top+box-1`` and columns ``left..left+box-1``; the task default is the centred
    6x6 box at 16 px, scaled with the size; random: the default task drops 70% of the pixels (4096 Bernoulli
    draws: sd 0.007, bounds at 4 sd)."""
    want = np.ones((8, 8))
    want[1:4, 4:7] = 0
    np.testing.assert_array_equal(BoxInpainting(8, box=3, top=1, left=4).mask[0, 0].numpy(), want)
    for size, box in ((16, 6), (32, 12)):
        want = np.ones((size, size))
        lo = (size - box) // 2  # an even margin: centred is unambiguous
        want[lo:lo + box, lo:lo + box] = 0
        np.testing.assert_array_equal(make_operator("inpaint", size).mask[0, 0].numpy(), want)
    for op, drop in ((make_operator("random-inpaint", 64), 0.7), (RandomInpainting(64, drop=0.2, seed=3), 0.2)):
        assert abs(float(1 - op.mask.mean()) - drop) < 0.03


@pytest.mark.parametrize("op", [SuperResolution(2, noise_std=0.1), SuperResolution(2, noise_std=0.01),
                                BoxInpainting(32, box=8, noise_std=0.1)], ids=repr)
def test_measurement_noise_has_the_asked_standard_deviation(op):
    """``measure(x) - A x`` is ``noise_std`` times standard normal noise (on the observed pixels): its sample std on
    >= 2048 values is within 8% (5 sd of the estimate) of ``noise_std``; exactly 0 where nothing is observed."""
    x = _randn(4, 2, 32, 32, seed=7).float()
    r = op.measure(x, torch.Generator().manual_seed(0)) - op(x)
    observed = r[op.mask.expand_as(r) > 0] if hasattr(op, "mask") else r.flatten()
    assert abs(float(observed.std()) / op.noise_std - 1) < 0.08
    if hasattr(op, "mask"):
        assert (r[op.mask.expand_as(r) == 0] == 0).all()


def test_ddim_update_caps_eta_above_one_at_sigma_next():
    """``ddim_eta > 1`` is capped at ``c = sigma_next`` (docstring): the step is then ``alpha' z0 + sigma' noise``."""
    z0, eps, noise = _randn(1, 4, seed=8), _randn(1, 4, seed=9), _randn(1, 4, seed=10)
    a, s, a_n, s_n = 0.6, 0.8, 0.8, 0.6
    torch.testing.assert_close(ddim_update(z0, eps, a, s, a_n, s_n, 3.0, noise), a_n * z0 + s_n * noise)


def test_dps_ancestral_step_matches_the_written_out_ddpm_update():
    """DPS with ``ddim_eta=1`` (DDPM ancestral): ``z' = alpha' z0 + sqrt(sigma'^2 - c^2) eps + c xi - zeta grad``,
    ``c = (sigma'/sigma) sqrt(1 - alpha^2/alpha'^2)``, ``xi`` standard normal drawn (float32) from the generator, one
    draw per step that lands on a noisy level; float64, so 1e-10 is rounding only."""
    alphas = [0.6, 0.8, 0.95, 1.0]
    sigmas = [0.8, 0.6, math.sqrt(1 - 0.95**2), 0.0]
    op = SuperResolution(2)
    y = op(_randn(2, 1, 8, 8, seed=11).clamp(-1, 1))
    z_start, zeta = _randn(2, 1, 8, 8, seed=12), 0.3

    def eps_fn(z):
        return torch.tanh(z) + 0.1 * z * z

    def model_fn(z, i):
        eps = eps_fn(z)
        return (z - sigmas[i] * eps) / alphas[i], eps

    got = DPS(step_size=zeta, ddim_eta=1.0).sample(model_fn, InverseProblem(op, y), z_start, alphas, sigmas,
                                                   torch.Generator().manual_seed(5)).sample
    g = torch.Generator().manual_seed(5)
    z = z_start
    for i in range(3):
        a, s, a_n, s_n = alphas[i], sigmas[i], alphas[i + 1], sigmas[i + 1]
        zg = z.detach().requires_grad_(True)
        eps = eps_fn(zg)
        x0 = (zg - s * eps) / a
        (grad,) = torch.autograd.grad((y - op(x0)).flatten(1).norm(dim=1).sum(), zg)
        c = (s_n / s) * math.sqrt(1 - a**2 / a_n**2)
        xi = torch.randn(z.shape, generator=g, dtype=torch.float32).double() if s_n > 0 else 0.0
        z = (a_n * x0 + math.sqrt(s_n**2 - c**2) * eps + c * xi - zeta * grad).detach()
    torch.testing.assert_close(got, z, rtol=1e-10, atol=1e-10)


def _toy_model(alphas, sigmas):
    def eps_fn(z):
        return torch.tanh(z) + 0.1 * z * z

    def model_fn(z, i):
        eps = eps_fn(z)
        return (z - sigmas[i] * eps) / alphas[i], eps

    return eps_fn, model_fn


def test_stsl_squared_loss_steps_zeta_alpha_squared():
    """``loss="squared"``: the inner step is ``z <- z - zeta alpha^2 grad_z ||y - A z0_hat||^2 / 2`` (a step of size
    zeta on ``z0_hat``, ``PosteriorMethod`` docstring), then DDIM from the refined point with the last inner ``eps``;
    written out for one level and two inner steps, float64 (1e-10: rounding)."""
    alphas, sigmas = [0.6, 0.8], [0.8, 0.6]
    eps_fn, model_fn = _toy_model(alphas, sigmas)
    op = BoxInpainting(4, box=2)
    y = op(_randn(2, 1, 4, 4, seed=13))
    z_start, zeta = _randn(2, 1, 4, 4, seed=14), 0.7
    got = STSL(eta=0.0, step_size=zeta, inner_steps=2, loss="squared", init="noise").sample(
        model_fn, InverseProblem(op, y), z_start, alphas, sigmas).sample
    a, s, a_n, s_n = alphas[0], sigmas[0], alphas[1], sigmas[1]
    z = z_start
    for _ in range(2):
        zg = z.detach().requires_grad_(True)
        eps = eps_fn(zg)
        x0 = (zg - s * eps) / a
        (grad,) = torch.autograd.grad(0.5 * ((y - op(x0)) ** 2).sum(), zg)
        z, last_eps = (z - zeta * a * a * grad).detach(), eps.detach()
    want = a_n * (z - s * last_eps) / a + s_n * last_eps
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_stsl_probe_groups_of_two_give_the_ungrouped_gradient():
    """``probe_batch`` only bounds memory: 3 probes in groups of 2 (a full and a partial group) give the gradient of all
    probes in one call (same probes from the same generator; float64: 1e-10)."""
    eps_fn, model_fn = _toy_model([0.6], [0.8])
    op = BoxInpainting(4, box=2)
    problem = InverseProblem(op, op(_randn(2, 1, 4, 4, seed=15)))
    z = _randn(2, 1, 4, 4, seed=16)
    grads = [STSL(eta=0.8, num_probes=3, probe_batch=b)._inner_grad(model_fn, problem, z, 0, 0.6, 0.8,
                                                                     torch.Generator().manual_seed(2))[0]
             for b in (None, 2)]
    assert float((grads[0] - STSL(eta=0.0)._inner_grad(model_fn, problem, z, 0, 0.6, 0.8, None)[0]).abs().max()) > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)


def test_stsl_defaults_are_the_papers():
    """Rout et al. 2024 (research note): eta 0.02, K = 5 inner iterations, one probe, a deterministic DDIM outer step,
    initialised from the noised back-projected measurement."""
    m = STSL()
    assert (m.eta, m.inner_steps, m.num_probes, m.ddim_eta, m.init) == (0.02, 5, 1, 0.0, "adjoint")


# ------------------------------------------------------------------------------------------------ the pipeline
@pytest.fixture(scope="module")
def eps_pipe():
    import fewstep

    return fewstep.load_default("digits-eps")


class _Recorder(PosteriorMethod):
    """Records the grid it is given and calls the model at the first and the last grid point (their timesteps)."""

    name = "recorder"

    def sample(self, model_fn, problem, noise, alphas, sigmas, generator=None):
        self.seen = ([float(v) for v in alphas], [float(v) for v in sigmas])
        for i in sorted({0, len(alphas) - 2}):
            model_fn(noise, i)
        return PosteriorResult(noise, len(alphas) - 1, 0)


@pytest.mark.parametrize("spacing,offset,steps,strength", [("trailing", 0, 4, 1.0), ("trailing", 0, 3, 0.5),
                                                          ("leading", 1, 3, 0.6), ("leading", 1, 21, 0.7)])
def test_posterior_grid_is_the_tail_of_diffusers_ddim_grid(eps_pipe, spacing, offset, steps, strength):
    """``strength < 1`` runs the last ``steps`` points of the ``ceil(steps / strength)``-step grid (21 / 0.7 = 30 up
    to rounding: 30 steps, not 31): the timesteps of diffusers' ``DDIMScheduler`` with the pipeline's spacing and
    offset, levels ``alpha = sqrt(alphas_cumprod[t])``, ``sigma = sqrt(1 - alphas_cumprod[t])`` and the final target
    ``(1, 0)`` (float32 alphas_cumprod: 1e-6)."""
    from diffusers import DDIMScheduler

    from fewstep.pipelines.posterior import posterior_sample

    old = eps_pipe.scheduler
    eps_pipe.scheduler = DDIMScheduler.from_config(old.config, timestep_spacing=spacing, steps_offset=offset)
    seen_t = []
    hook = eps_pipe.unet.register_forward_pre_hook(lambda module, args: seen_t.append(float(args[1][0])))
    try:
        ref = DDIMScheduler.from_config(eps_pipe.scheduler.config)
        full = round(steps / strength)
        ref.set_timesteps(full)
        want_t = [float(t) for t in ref.timesteps[full - steps:]]
        rec = _Recorder(init="adjoint", strength=strength)
        y = make_operator("sr", 16)(torch.zeros(1, 1, 16, 16))
        posterior_sample(eps_pipe, make_operator("sr", 16), y, rec, steps, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
        eps_pipe.scheduler = old
    assert seen_t == sorted({want_t[0], want_t[-1]}, reverse=True)
    acp = ref.alphas_cumprod.double()
    want_a = [math.sqrt(float(acp[int(t)])) for t in want_t] + [1.0]
    want_s = [math.sqrt(1 - float(acp[int(t)])) for t in want_t] + [0.0]
    np.testing.assert_allclose(rec.seen[0], want_a, rtol=0, atol=1e-6)
    np.testing.assert_allclose(rec.seen[1], want_s, rtol=0, atol=1e-6)


def test_stsl_probes_get_their_images_class_labels(eps_pipe):
    """STSL stacks its probes along the batch: each probe must be evaluated with its own image's class label, so
    image 1 of a batch with distinct labels is image 1 sampled alone with its label and generator (diffusers'
    one-generator-per-image convention; batched convolutions differ by ~1e-5 per call)."""
    from fewstep.pipelines.posterior import posterior_sample

    op = make_operator("inpaint", 16)
    y = op(torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    method = STSL(step_size=1.0, inner_steps=1, num_probes=2, strength=0.5, eta=3.0)
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = posterior_sample(eps_pipe, op, y, method, 1, generator=gens(3, 4), class_labels=[3, 7]).images
    alone = posterior_sample(eps_pipe, op, y[1:], method, 1, generator=gens(4), class_labels=[7]).images
    torch.testing.assert_close(both[1:], alone, atol=5e-3, rtol=0)


def test_run_inverse_task_measures_with_noise_and_shows_the_upsampled_measurement(eps_pipe):
    """``run_inverse_task(noise_std=...)`` measures the truth with that noise, and ``degraded`` is the measurement
    upsampled by nearest neighbours (``F.interpolate``): 128 noise values, their std within 30% (~3.5 sd)."""
    from fewstep.pipelines.posterior import run_inverse_task

    def classifier(x):
        return torch.zeros(x.shape[0], 10)

    r = run_inverse_task(eps_pipe, "sr", DPS(step_size=0.0), num_images=2, steps=1, seed=0, noise_std=0.2,
                         classifier=classifier)
    y = r.degraded[..., ::2, ::2]
    torch.testing.assert_close(r.degraded, F.interpolate(y, scale_factor=2, mode="nearest"), rtol=0, atol=0)
    assert abs(float((y - make_operator("sr", 16)(r.truth)).std()) / 0.2 - 1) < 0.3
