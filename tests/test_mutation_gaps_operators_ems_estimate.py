"""Gaps a mutation probe (round 10b) of the measurement operators and of DPM-Solver-v3's EMS estimation found, closed
against independent references: the operators' documented shapes, bounds and defaults (a box that lies inside the
image, the task default box ``6/16`` of the size rounded to the nearest pixel, a motion angle uniform in
``[0, 180)``, the task's ``noise_std`` honoured by every task); the EMS finalisation against the paper's per-element
least squares ``f' ~ s f + b`` solved by ``numpy.linalg.lstsq`` on the samples themselves (v3 sec. 3.2, app. C.1),
with ``l`` quadratic in ``lambda`` so its derivative is known in closed form; the estimator's noise draws checked
from what the model is shown; and ``text_to_image_ems`` against its docstring (prompts cycled, ``num_samples``
latents from fewstep's DPM-Solver++ at the given steps and CFG scale, the empty prompt's branch)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from fewstep.guidance.operators import (
    OPERATORS,
    BoxInpainting,
    GaussianBlur,
    Inpainting,
    MotionBlur,
    SuperResolution,
    make_operator,
)


# ------------------------------------------------------------------------------------------------ operators
def test_box_must_lie_inside_the_image_and_the_default_box_is_rounded_to_the_nearest_pixel():
    """``top``/``left`` range over ``0 .. size - box`` (the box inside the image: a box hanging over the edge would
    silently hide fewer pixels than asked); the task default is ``6/16`` of the size, to the nearest pixel
    (10 px: 3.75 -> 4, 24 px: 9, 40 px: 15), centred; its mask hides exactly ``box^2`` pixels."""
    for kw in ({"top": 6}, {"left": 6}, {"top": -1}):
        with pytest.raises(ValueError):
            BoxInpainting(8, box=3, **kw)
    edge = BoxInpainting(8, box=3, top=5, left=5)  # the last position that fits
    assert float((edge.mask == 0).sum()) == 9
    for size in (10, 24, 40):
        op = make_operator("inpaint", size)
        box = int(np.floor(size * 6 / 16 + 0.5))
        assert op.box[2] == box, (size, op.box)
        assert float((op.mask == 0).sum()) == box * box
        top, left, _ = op.box
        assert abs((size - box - top) - top) <= 1 and abs((size - box - left) - left) <= 1  # centred


def test_inpainting_mask_and_measurement_batches_are_checked():
    """A mask of batch 2 does not fit images of batch 3 (ValueError naming it, not a broadcasting RuntimeError); a
    measurement's batch is the images' or 1."""
    with pytest.raises(ValueError, match="does not fit the mask"):
        Inpainting(torch.ones(2, 1, 4, 4))(torch.zeros(3, 1, 4, 4))
    Inpainting(torch.ones(2, 1, 4, 4))(torch.zeros(2, 3, 4, 4))  # per-image masks broadcast over channels
    op = SuperResolution(2)
    for n in (1, 2):
        op.check_measurement(torch.zeros(n, 1, 4, 4), (2, 1, 8, 8))
    with pytest.raises(ValueError, match="measurement shape"):
        op.check_measurement(torch.zeros(3, 1, 4, 4), (2, 1, 8, 8))


def test_inpainting_keeps_the_images_dtype():
    """``A x = m * x`` in the image's own dtype (a bfloat16 or float64 image is not promoted to float32)."""
    op = BoxInpainting(6, box=2, top=1, left=2)
    for dtype in (torch.bfloat16, torch.float64):
        x = torch.arange(36, dtype=dtype).reshape(1, 1, 6, 6) / 7
        want = x.clone()
        want[..., 1:3, 2:4] = 0
        for out in (op(x), op.adjoint(x), op.measure(x)):
            assert out.dtype == dtype
            assert torch.equal(out, want)


def test_seeded_motion_angle_is_uniform_in_0_to_180_degrees():
    """Without ``angle`` the streak's angle is seeded and uniform over the distinct orientations, ``[0, 180)``
    degrees (a line through the centre at ``a + 180`` is the same streak): 32 seeds all fall in range (an angle
    drawn on ``[0, 360)`` would leave it with probability 1 - 2^-32) and reach both halves of it."""
    angles = np.array([MotionBlur(5, seed=s).angle for s in range(32)])
    assert ((angles >= 0) & (angles < 180)).all(), angles
    assert (angles < 90).any() and (angles >= 90).any()


@pytest.mark.parametrize("task", sorted(OPERATORS))
def test_every_task_honours_its_noise_std(task):
    """``make_operator(task, size, noise_std)`` measures with that noise: ``measure(x) - A x`` has std ``noise_std``
    on the observed values (>= 128 of them: sample std within 35%, > 4 sd of the estimate) and the operator says so."""
    op = make_operator(task, 16, noise_std=0.05)
    assert op.noise_std == 0.05
    x = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    r = op.measure(x, torch.Generator().manual_seed(1)) - op(x)
    observed = r[op.mask.expand_as(r) > 0] if isinstance(op, Inpainting) else r.flatten()
    assert observed.numel() >= 128
    assert abs(float(observed.std()) / 0.05 - 1) < 0.35
    assert isinstance(op, (Inpainting, SuperResolution, GaussianBlur, MotionBlur))


# ------------------------------------------------------------------------------------------------ EMS estimation
def _vp_schedule():
    from fewstep.solvers.schedules import VPSchedule

    return VPSchedule.from_config(DDPMScheduler().config)


def test_ems_finalize_is_the_papers_least_squares_on_the_samples():
    """v3 sec. 3.2 / app. C.1 per element: ``l = E[jdiag]``; with ``u = e^{-lambda} eps``, ``y = x/alpha``,
    ``w = e^{-lambda} eps'``: ``f = u - l y``, ``f' = (l - 1) u + w - l' y`` and ``(s, b) = argmin E(f' - s f - b)^2``
    -- here ``numpy.linalg.lstsq`` on the 300 samples of every grid point. ``l`` is quadratic in ``lambda``
    (a different one per element), so ``l'`` is known in closed form (any second-order difference, ends included,
    is exact on it). Samples of size O(1), moments in float64: 1e-9 is rounding with a wide margin."""
    from fewstep.solvers.ems_estimate import EMSAccumulator

    lam = np.linspace(-3.0, 2.0, 6)
    c = np.array([[0.6, 0.1, -0.03], [0.2, -0.05, 0.04]])  # l = c0 + c1 lam + c2 lam^2, per element
    l_ref = c[:, 0] + c[:, 1] * lam[:, None] + c[:, 2] * lam[:, None] ** 2
    l_dot = c[:, 1] + 2 * c[:, 2] * lam[:, None]
    rng = np.random.default_rng(3)
    k = 300
    acc = EMSAccumulator(lam, (2,))
    s_ref, b_ref = np.zeros((lam.size, 2)), np.zeros((lam.size, 2))
    for i in range(lam.size):
        r = rng.normal(size=(k, 2, 4))
        jd = l_ref[i] + 0.1 * (r[..., 3] - r[..., 3].mean(0))  # per-sample Hutchinson terms with mean l
        u = 1.5 + r[..., 0]
        y = -0.5 + 2.0 * r[..., 1] + 0.3 * r[..., 0]
        w = 0.4 * u - 0.7 * y + 0.2 * r[..., 2] + 0.3 * u * u
        acc.add(i, *(torch.from_numpy(a) for a in (jd, u, y, w)))
        f = u - l_ref[i] * y
        fp = (l_ref[i] - 1.0) * u + w - l_dot[i] * y
        for e in range(2):
            (s_ref[i, e], b_ref[i, e]), *_ = np.linalg.lstsq(np.stack([f[:, e], np.ones(k)], 1), fp[:, e], rcond=None)
    ems = acc.finalize()
    np.testing.assert_allclose(ems.l, l_ref, rtol=0, atol=1e-12)
    assert np.abs(s_ref).min() > 0.05  # real slopes, not a floored variance
    np.testing.assert_allclose(ems.s, s_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ems.b, b_ref, rtol=1e-9, atol=1e-9)


def test_every_grid_point_and_batch_gets_its_own_standard_normal_noise():
    """``x = alpha x0 + sigma z`` with ``z`` standard normal, a fresh draw for every (grid point, batch) (module
    docstring). Read back from what the model is shown: with the ``"difference"`` time derivative the model is also
    called on plain tensors at ``lambda +- h``; ``z = (x - alpha x0)/sigma`` with ``alpha^2 = sigmoid(2 lambda)``
    (VP). The 4 x 2 draws are pairwise different, and pooled (8192 values) pass a Kolmogorov-Smirnov test against
    N(0, 1) (deterministic seeds; a unit-variance uniform is 0.05 away in KS distance, the 1e-6 critical value 0.03)."""
    from fewstep.solvers.ems_estimate import estimate_ems

    seen = {}

    def eps_fn(x, lam, dlam):
        if float(dlam) != 0.0:  # the time-difference calls: x is a plain tensor here
            seen.setdefault(lam, [])
            if not any(torch.equal(x, v) for v in seen[lam]):
                seen[lam].append(x.clone())
        return 0.5 * x

    data = torch.randn(32, 128, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ems = estimate_ems(eps_fn, data, _vp_schedule(), num_intervals=3, t_start=800.0, t_end=100.0, batch_size=16,
                       progress=False, time_derivative="difference")
    assert sorted(seen) == sorted(float(v) for v in ems.lambdas)
    zs = []
    for lam, xs in seen.items():
        assert len(xs) == 2  # one per batch, in batch order
        alpha, sigma = np.sqrt(1 / (1 + np.exp(-2 * lam))), np.sqrt(1 / (1 + np.exp(2 * lam)))
        zs += [(x - alpha * data[16 * b:16 * (b + 1)]) / sigma for b, x in enumerate(xs)]
    for a in range(len(zs)):
        for b in range(a):
            assert not torch.allclose(zs[a], zs[b]), (a, b)
    pooled = torch.cat([z.flatten() for z in zs]).sort().values
    cdf = torch.special.ndtr(pooled)  # the N(0, 1) CDF
    n = pooled.numel()
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max()  # Kolmogorov-Smirnov
    assert float(ks) < 0.03, float(ks)


def test_the_grid_spacing_limit_is_on_the_spacing_itself():
    """``num_intervals`` intervals over a lambda range R have spacing R / num_intervals; grids at or above the
    minimum EMS tables accept (``MIN_LAMBDA_GAP``) pass, below it are refused: R = 10.5 gaps, 10 intervals pass
    (spacing 1.05 gaps), 11 do not (0.95)."""
    from fewstep.solvers.ems_estimate import ems_lambdas
    from fewstep.solvers.grids import MIN_LAMBDA_GAP

    schedule = _vp_schedule()
    lam0 = 0.3
    t_start = float(schedule.t_of_lambda(lam0))
    t_end = float(schedule.t_of_lambda(lam0 + 10.5 * MIN_LAMBDA_GAP))
    lam = ems_lambdas(schedule, 10, t_start, t_end)
    assert lam.size == 11
    np.testing.assert_allclose(np.diff(lam), 1.05 * MIN_LAMBDA_GAP, rtol=1e-3)
    with pytest.raises(ValueError, match="below the minimum"):
        ems_lambdas(schedule, 11, t_start, t_end)


def test_difference_time_derivative_is_central_inside_and_three_point_at_the_ends():
    """``time_derivative="difference"``: ``d eps/d lambda`` is the central difference over the neighbouring grid
    points in the interior and the second-order one-sided three-point rule ``(-3 e_0 + 4 e_1 - e_2)/(2 h)`` (mirrored
    at the last point) at the ends (``estimate_ems``'s docstring). For ``eps = c(lambda)``, cubic and independent of
    ``x``: l = 0, f = e^{-lambda} c is the same for every sample, so s = 0 and b = e^{-lambda}(D c - c) with ``D`` that
    difference written out by hand on the grid; a cubic separates the rules (their errors h^2 c^(3)/6 and
    h^2 c^(3)/3 differ by ~0.1 here), float64 rounding is ~1e-15 relative."""
    from fewstep.solvers.ems_estimate import estimate_ems

    q = torch.tensor([0.7, -0.4], dtype=torch.float64)

    def c_of(lam):
        return q * lam**3 + 0.2 * lam

    def eps_fn(x, lam, dlam):
        return c_of(torch.tensor(lam, dtype=torch.float64) + dlam).expand_as(x)

    data = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ems = estimate_ems(eps_fn, data, _vp_schedule(), num_intervals=5, t_start=700.0, t_end=200.0, batch_size=3,
                       progress=False, time_derivative="difference")
    lam = np.asarray(ems.lambdas)
    c = c_of(torch.from_numpy(lam)[:, None]).numpy()
    h = lam[1] - lam[0]
    dc = np.empty_like(c)
    dc[1:-1] = (c[2:] - c[:-2]) / (lam[2:] - lam[:-2])[:, None]
    dc[0] = (-3 * c[0] + 4 * c[1] - c[2]) / (2 * h)
    dc[-1] = (3 * c[-1] - 4 * c[-2] + c[-3]) / (2 * h)
    np.testing.assert_allclose(ems.l, 0.0, atol=0)
    np.testing.assert_allclose(ems.s, 0.0, atol=0)
    np.testing.assert_allclose(ems.b, np.exp(-lam)[:, None] * (dc - c), rtol=1e-9, atol=1e-12)


def test_variance_floor_counts_l_squared_times_the_moment_of_y():
    """s is zeroed only where Var f <= 1e-9 (E[u^2] + l^2 E[y^2]) (``ems_estimate``'s floor, relative to the moments
    f = u - l y is formed from). l = 0.1, y ~ 1e4: the floor is ~1e-3, Var f = l^2 Var y ~ 0.01 is above it, so s
    is the least-squares slope (numpy ``polyfit``, ~ -3), not 0. Moments of size 1e6 differenced in float64 leave
    ~1e-8 relative in Var f: 1e-5 is loose."""
    from fewstep.solvers.ems_estimate import EMSAccumulator

    lam = np.linspace(-1.0, 1.0, 3)
    acc = EMSAccumulator(lam, (1,))
    rng = np.random.default_rng(4)
    k, l0 = 500, 0.1
    s_ref, b_ref = [], []
    for i in range(lam.size):
        r = rng.normal(size=(k, 1, 3))
        u, y = 1e-3 * r[..., 0], 1e4 + r[..., 1]
        w = 0.3 * r[..., 1] + 0.1 * r[..., 2]
        acc.add(i, torch.full((k, 1), l0, dtype=torch.float64), *(torch.from_numpy(a) for a in (u, y, w)))
        slope, intercept = np.polyfit((u - l0 * y)[:, 0], ((l0 - 1) * u + w)[:, 0], 1)  # l' = 0
        s_ref.append([slope])
        b_ref.append([intercept])
    ems = acc.finalize()
    assert np.abs(np.array(s_ref)).min() > 1.0
    np.testing.assert_allclose(ems.s, np.array(s_ref), rtol=1e-5)
    np.testing.assert_allclose(ems.b, np.array(b_ref), rtol=1e-5, atol=1e-3)


def _small_checkpoint(tmp_path):
    """An EMS checkpoint of 4 samples in batches of 2 on 3 grid points: its path, header and tensors."""
    from safetensors import safe_open

    from fewstep.solvers.ems_estimate import estimate_ems

    def eps_fn(x, lam, dlam):
        return 0.5 * x

    data = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ck = tmp_path / "ems.ckpt.safetensors"
    estimate_ems(eps_fn, data, _vp_schedule(), num_intervals=2, batch_size=2, checkpoint=ck, progress=False)
    with safe_open(str(ck), framework="pt") as f:
        return ck, f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_checkpoint_with_more_batches_than_the_samples_make_is_damaged(tmp_path):
    """4 samples in batches of 2 make 2 batches per grid point: a checkpoint recording 3 finished batches (its
    counts still 4) cannot come from these settings and is refused as damaged."""
    from safetensors.torch import save_file

    from fewstep.solvers.ems_estimate import EMSAccumulator

    ck, header, tensors = _small_checkpoint(tmp_path)
    assert tensors["batches"].tolist() == [2, 2, 2] and tensors["counts"].tolist() == [4, 4, 4]
    tensors["batches"] = torch.full_like(tensors["batches"], 3)
    save_file(tensors, str(ck), metadata=header)
    with pytest.raises(ValueError, match="damaged"):
        EMSAccumulator.load(ck)


def test_a_checkpoint_whose_grid_is_slightly_off_is_not_resumed(tmp_path):
    """The finished tables take their lambdas from the checkpoint, so a checkpoint whose grid differs from the one its
    settings give is refused even by 1e-6 (the tolerance covers only last-bit platform differences, 1e-12 of the
    range): a table on a shifted grid would silently mislabel every row."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fewstep.solvers.ems_estimate import estimate_ems

    def eps_fn(x, lam, dlam):
        return 0.5 * x

    data = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ck = tmp_path / "ems.ckpt.safetensors"
    kw = {"num_intervals": 2, "batch_size": 2, "checkpoint": ck, "progress": False}
    first = estimate_ems(eps_fn, data, _vp_schedule(), **kw)
    with safe_open(str(ck), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["lambdas"] = tensors["lambdas"] + 1e-6
    save_file(tensors, str(ck), metadata=header)
    with pytest.raises(ValueError, match="damaged: its grid point 0"):
        estimate_ems(eps_fn, data, _vp_schedule(), **kw)
    assert np.isfinite(first.l).all()


def test_weights_digest_sees_a_scaled_weight_whose_sum_is_zero():
    """``weights_digest`` changes when a weight is scaled (its docstring): a parameter [1, -1] scaled to [2, -2] keeps
    its sum but not its sum of squares, nor its identity."""
    from fewstep.solvers.ems_estimate import weights_digest

    def module(values):
        m = torch.nn.Module()
        m.w = torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))
        return m

    assert weights_digest(module([1.0, -1.0])) != weights_digest(module([2.0, -2.0]))
    assert weights_digest(module([1.0, -1.0])) == weights_digest(module([1.0, -1.0]))


def test_a_checkpoint_of_other_data_is_refused_even_if_only_the_last_sample_differs(tmp_path):
    """A checkpoint is resumed only on the data it was computed on (``data_digest`` in its settings): data that differ
    in their last sample alone are other data."""
    from fewstep.solvers.ems_estimate import estimate_ems

    def eps_fn(x, lam, dlam):
        return 0.5 * x

    data = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ck = tmp_path / "ems.ckpt.safetensors"
    kw = {"num_intervals": 2, "batch_size": 2, "checkpoint": ck, "progress": False}
    estimate_ems(eps_fn, data, _vp_schedule(), **kw)
    other = data.clone()
    other[-1] += 1.0
    with pytest.raises(ValueError, match="other settings"):
        estimate_ems(eps_fn, other, _vp_schedule(), **kw)


def test_class_conditional_ems_takes_every_training_image_and_forwards_its_settings(monkeypatch, tmp_path):
    """``num_samples`` may be the whole training split (the first ``num_samples`` images: here all of them), one
    more is refused; the estimation settings reach ``estimate_ems`` as given."""
    import fewstep
    from fewstep.calibrate import ems as ems_calibration
    from fewstep.datasets import load_digits_images

    pipe = fewstep.load_default("digits-flow", sampler=None)
    images, _ = load_digits_images(int(pipe.unet.config.sample_size), "train")
    seen = {}

    def capture(eps_fn, data, schedule, **kwargs):
        seen.update(kwargs, data=data)
        raise KeyboardInterrupt

    monkeypatch.setattr(ems_calibration, "estimate_ems", capture)
    settings = {"num_intervals": 5, "batch_size": 7, "probes": 3, "seed": 11, "t_start": 900.0, "t_end": 20.0,
                "checkpoint": tmp_path / "ck.safetensors", "time_derivative": "jvp"}
    with pytest.raises(KeyboardInterrupt):
        ems_calibration.class_conditional_ems(pipe, "digits-flow", num_samples=images.shape[0], progress=False,
                                              **settings)
    assert torch.equal(seen["data"], images.to(seen["data"].dtype))
    assert {k: seen[k] for k in settings} == settings
    with pytest.raises(ValueError, match="exceeds"):
        ems_calibration.class_conditional_ems(pipe, "digits-flow", num_samples=images.shape[0] + 1, progress=False)


def test_a_checkpoint_with_sums_at_an_unstarted_grid_point_is_damaged(tmp_path):
    """A grid point with no finished batch must hold zero sums (a resumed run adds its batches to them): a checkpoint
    whose last grid point records 0 batches and 0 samples but keeps its sums is refused as damaged."""
    from safetensors.torch import save_file

    from fewstep.solvers.ems_estimate import EMSAccumulator

    ck, header, tensors = _small_checkpoint(tmp_path)
    assert bool(tensors["sums"][-1].ne(0).any())
    tensors["batches"][-1] = 0
    tensors["counts"][-1] = 0
    save_file(tensors, str(ck), metadata=header)
    with pytest.raises(ValueError, match="damaged"):
        EMSAccumulator.load(ck)


class _EmbedUNet(torch.nn.Module):
    """eps = x * mean(text embedding) (time-independent): the output tells which prompt's embedding it was given."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
        self.config = types.SimpleNamespace(sample_size=3, in_channels=2)

    device = property(lambda self: torch.device("cpu"))
    dtype = property(lambda self: torch.float64)

    def forward(self, x, t, encoder_hidden_states):
        return types.SimpleNamespace(sample=self.gain * x * encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1))


class _LoggingPipe:
    """An SD-like pipeline: records every generation call and returns latents drawn from the given generator."""

    def __init__(self, unet, scheduler, log):
        self.unet, self.scheduler, self.log = unet, scheduler, log

    @property
    def components(self):
        return {"unet": self.unet, "scheduler": self.scheduler, "log": self.log}

    def set_progress_bar_config(self, **kwargs):
        pass

    def encode_prompt(self, prompts, device, num_images, do_cfg):
        return torch.stack([torch.full((4, 5), 1.0 + len(p), dtype=torch.float64) for p in prompts]), None

    def __call__(self, prompts, num_inference_steps, guidance_scale, height, width, generator, output_type):
        self.log.append({"prompts": list(prompts), "steps": num_inference_steps, "cfg": guidance_scale,
                         "scheduler": self.scheduler, "output_type": output_type})
        return types.SimpleNamespace(images=torch.randn(len(prompts), 2, 3, 3, generator=generator))


def test_text_to_image_ems_data_and_branch_follow_the_docstring(monkeypatch):
    """v3 app. J.2 as ``text_to_image_ems`` documents it: ``num_samples`` latents (5 in batches of 2: 2 + 2 + 1), the
    prompts cycled over all of them in order, each batch generated by fewstep's DPM-Solver++ with ``sample_steps`` at
    ``guidance_scale`` (latent output), every batch with its own noise (no two latents alike), the settings forwarded
    (the time derivative a ``"difference"`` by default); the statistics are those of the unconditional branch, the
    empty prompt's embedding (here eps = x * (1 + len(prompt)) = x), and a scheduler config without
    ``prediction_type`` means diffusers' default, epsilon."""
    from fewstep import samplers
    from fewstep.calibrate import ems as ems_calibration

    config = {k: v for k, v in DDPMScheduler().config.items() if k != "prediction_type"}
    log = []
    pipe = _LoggingPipe(_EmbedUNet(), types.SimpleNamespace(config=config), log)
    seen = {}

    def capture(eps_fn, data, schedule, **kwargs):
        seen.update(kwargs, data=data, eps_fn=eps_fn)
        raise KeyboardInterrupt  # the estimate itself is tested above

    monkeypatch.setattr(ems_calibration, "estimate_ems", capture)
    prompts = ["a cat", "a red square", "x"]
    with pytest.raises(KeyboardInterrupt):
        ems_calibration.text_to_image_ems(pipe, "m", prompts, num_samples=5, batch_size=2, sample_steps=3,
                                          guidance_scale=4.5, num_intervals=4, probes=2, seed=3,
                                          progress=False)
    assert [len(c["prompts"]) for c in log] == [2, 2, 1]
    assert sum((c["prompts"] for c in log), []) == [prompts[j % 3] for j in range(5)]
    for c in log:
        assert (c["steps"], c["cfg"], c["output_type"]) == (3, 4.5, "latent")
        assert type(c["scheduler"]) is samplers.get("dpm-solver++")
    data = seen["data"]
    assert tuple(data.shape) == (5, 2, 3, 3)
    flat = data.reshape(5, -1)
    assert all(not torch.allclose(flat[a], flat[b]) for a in range(5) for b in range(a))
    assert seen["meta"]["prediction_type"] == "epsilon" and seen["meta"]["branch"].startswith("unconditional")
    assert (seen["num_intervals"], seen["batch_size"], seen["probes"], seen["seed"]) == (4, 2, 2, 3)
    assert seen["time_derivative"] == "difference"  # the default, as for the class-conditional models
    x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        eps = seen["eps_fn"](x, 0.3, torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(eps, x, rtol=1e-12, atol=1e-12)  # the empty prompt: 1 + len("") = 1
