"""Mutation gaps of the benchmark metrics (digits evaluation, Frechet distance, image metrics, FD reference
folders), the grid runner's scoring, and the CLI's argument checks: each test compares with an independent
reference (a hand formula, scipy, brute force) or the documented contract."""

from __future__ import annotations

import types
from typing import ClassVar

import numpy as np
import pytest
import scipy.linalg
import torch

from fewstep.datasets import load_digits_images


# ---------------------------------------------------------------------------------------------- digits_eval
class _FakeClassifier(torch.nn.Module):
    """Features: a fixed linear map of the model-space pixels (8x8 -> 5); head: a fixed linear map (5 -> 10)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(64, 5, generator=g, dtype=torch.float64)
        self.h = torch.randn(5, 10, generator=g, dtype=torch.float64)

    @property
    def dtype(self):
        return torch.float64

    def features(self, x):
        return x.reshape(len(x), -1).double() @ self.w

    def head(self, f):
        return f @ self.h


class _FakePipe:
    """Records every call; its output is a fixed function of the given noise with exact +-1 values (a clipped
    pixel's |x| = 1 is not "beyond 1") and values beyond 1, plus a label-dependent offset of the first row."""

    def __init__(self, nfe: int):
        self.unet = types.SimpleNamespace(config=types.SimpleNamespace(in_channels=1, sample_size=8))
        self.scheduler = types.SimpleNamespace(timesteps=list(range(nfe)))
        self.calls = []

    @staticmethod
    def transform(noise, labels):
        x = torch.where(noise.abs() < 0.4, torch.sign(noise), 1.3 * noise)
        x = x.clone()
        x[:, :, 0] += 0.05 * torch.as_tensor(labels, dtype=x.dtype).reshape(-1, 1, 1)  # first row: label-dependent
        return x

    def __call__(self, labels, num_inference_steps, guidance, latents, output_type):
        self.calls.append((list(labels), num_inference_steps, guidance, latents.clone(), output_type))
        return types.SimpleNamespace(images=self.transform(latents, labels))


def _sqrtm_fd(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID's textbook formula with scipy.linalg.sqrtm (unbiased covariances)."""
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real))


def test_evaluate_digits_matches_an_independent_recomputation():
    """Per-sample noise from seed + global index (batch size 7 splits the 20 samples unevenly), labels in class
    order, accuracy, FD to the test split and floor (train vs test) with scipy's sqrtm, the saturation metrics
    (mean |x| per sample, share of pixels with |x| > 1 strictly), NFE and the default guidance (CFG 3)."""
    from fewstep.bench.digits_eval import evaluate_digits

    pipe, clf = _FakePipe(nfe=7), _FakeClassifier()
    q = evaluate_digits(pipe, clf, num_per_class=2, steps=3, seed=11, batch_size=7, progress=False)
    labels = [c for c in range(10) for _ in range(2)]
    noise = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(11 + i)) for i in range(20)])
    got_noise = torch.cat([c[3] for c in pipe.calls])
    torch.testing.assert_close(got_noise, noise, rtol=0, atol=0)
    assert [lab for c in pipe.calls for lab in c[0]] == labels
    assert [len(c[0]) for c in pipe.calls] == [7, 7, 6] and {c[1] for c in pipe.calls} == {3}
    rule = pipe.calls[0][2]
    assert rule.name == "cfg" and rule.guidance_scale == 3.0
    x = _FakePipe.transform(noise, labels).double()
    assert q.mean_abs == pytest.approx(float(x.abs().mean()), rel=1e-6)  # float32 sums: ~1e-7
    share = float((x.abs() > 1).double().mean())
    assert 0.1 < share < 0.9 and float((x.abs() == 1).double().mean()) > 0.05  # both kinds present
    assert q.clipped == pytest.approx(share, rel=1e-6)
    feats = clf.features(((x + 1) / 2).clamp(0, 1) * 2 - 1).numpy()
    want_acc = float(np.mean((feats @ clf.h.numpy()).argmax(1) == np.asarray(labels)))
    assert q.accuracy == pytest.approx(want_acc, abs=1e-6)  # a float32 mean of 20 hits
    test, _ = load_digits_images(8, "test")
    train, _ = load_digits_images(8, "train")
    f_test, f_train = (clf.features(((t.double() + 1) / 2).clamp(0, 1) * 2 - 1).numpy() for t in (test, train))
    assert q.fd == pytest.approx(_sqrtm_fd(feats, f_test), rel=1e-6)  # sqrtm vs eigen/SVD: ~1e-10 relative
    assert q.fd_floor == pytest.approx(_sqrtm_fd(f_train, f_test), rel=1e-6)
    assert (q.num_samples, q.steps, q.nfe, q.guidance_scale, q.guidance) == (20, 3, 7, 3.0, "cfg")


def test_evaluate_digits_sample_count_bounds():
    """``num_per_class >= 2`` (as its message says): 2 runs, 1 is refused."""
    from fewstep.bench.digits_eval import evaluate_digits

    evaluate_digits(_FakePipe(nfe=1), _FakeClassifier(), num_per_class=2, steps=1, progress=False)
    with pytest.raises(ValueError, match="need num_per_class >= 2"):
        evaluate_digits(_FakePipe(nfe=1), _FakeClassifier(), num_per_class=1, steps=1, progress=False)


# ---------------------------------------------------------------------------------------------- metrics
def _nuclear_fd(f1: np.ndarray, f2: np.ndarray) -> float:
    """FD of the Gaussians fitted to two feature sets with ``tr (C_1 C_2)^{1/2} = ||A B^T||_* / sqrt((n-1)(m-1))``
    (``A``, ``B`` the centred features): one SVD of an n x m matrix, no covariance and no eigenvalue threshold."""
    a, b = f1 - f1.mean(0), f2 - f2.mean(0)
    n, m = len(f1), len(f2)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    d = f1.mean(0) - f2.mean(0)
    return float(d @ d + (a * a).sum() / (n - 1) + (b * b).sum() / (m - 1) - 2 * nuclear)


def test_frechet_distance_of_a_singular_covariance_drops_only_rounding_eigenvalues():
    """5 samples of 64 features (rank 4) against 400: the eigenvalues of the singular covariance that are rounding
    noise (below D * eps * max, numpy's rank tolerance) must not enter the square roots. Both routes are exact up to
    ~1e-16 relative; keeping eigenvalues just above eps * max shifted the distance by ~2e-9 relative."""
    from fewstep.bench.metrics import frechet_distance_features

    g = np.random.default_rng(1)
    f1, f2 = g.normal(size=(5, 64)), g.normal(size=(400, 64)) * 1.3 + 0.1
    assert frechet_distance_features(f1, f2) == pytest.approx(_nuclear_fd(f1, f2), rel=1e-12)


def test_frechet_distance_closed_form_for_diagonal_covariances_and_shape_checks():
    """Diagonal covariances: ``FD = |mu_1 - mu_2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2``; a mean or covariance of
    another length is a shape error, never broadcast (a length-1 mean would broadcast silently)."""
    from fewstep.bench.metrics import frechet_distance

    a, b = np.array([0.25, 4.0, 1.0, 0.0]), np.array([1.0, 1.0, 9.0, 2.0])
    m1, m2 = np.array([1.0, -2.0, 0.5, 0.0]), np.array([0.0, 1.0, 0.5, 3.0])
    want = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    eye = np.eye(2)
    for args in ((np.zeros(2), eye, np.ones(1), eye), (np.zeros(2), np.eye(3), np.zeros(2), eye),
                 (np.zeros(2), eye, np.zeros(2), np.eye(3)), (np.zeros(2), np.eye(1), np.zeros(2), eye)):
        with pytest.raises(ValueError, match="shape mismatch"):
            frechet_distance(*args)


# ---------------------------------------------------------------------------------------------- image metrics
def _ssim_one_window(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Wang et al. (2004) eq. 13 over the whole image as the single window (sample variances, N - 1)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = x.mean(), y.mean()
    vx, vy = x.var(ddof=1), y.var(ddof=1)
    cxy = ((x - mx) * (y - my)).sum() / (x.size - 1)
    return float((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))


def test_ssim_of_an_image_exactly_one_window_large_and_window_bounds():
    """An image of exactly ``win_size`` pixels a side is one window (scikit-image accepts it too); ``win_size`` must
    be an odd integer >= 3 (1 and 2 refused with that message)."""
    from fewstep.bench.image_metrics import ssim

    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 7, 7, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.rand(2, 1, 7, 7, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(x, y)
    for i in range(2):
        assert got[i].item() == pytest.approx(_ssim_one_window(x[i, 0].numpy(), y[i, 0].numpy(), 1.0), abs=1e-12)
    for bad in (1, 2):
        with pytest.raises(ValueError, match=f"`win_size` must be an odd integer >= 3, got {bad}"):
            ssim(x, y, win_size=bad)


def test_range_tolerance_is_relative_to_data_range():
    """Values may leave [0, data_range] by ``RANGE_TOLERANCE * data_range`` (1e-6 of it) only: 1 + 1e-5 with
    ``data_range=1`` is refused; 255 + 1e-4 with ``data_range=255`` (4e-7 of it) passes."""
    from fewstep.bench.image_metrics import RANGE_TOLERANCE, psnr

    assert RANGE_TOLERANCE == 1e-6
    x = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)
    y = x.clone()
    y[0, 0, 0, 0] = 1 + 1e-5
    with pytest.raises(ValueError, match=r"`y` must hold values in \[0, data_range\]"):
        psnr(x, y)
    y[0, 0, 0, 0] = -1e-5
    with pytest.raises(ValueError, match=r"`y` must hold values in \[0, data_range\]"):
        psnr(x, y)
    y255 = 255 * x
    y255[0, 0, 0, 0] = 255 + 1e-4
    mse = (255 + 1e-4 - 127.5) ** 2 / 64
    assert psnr(255 * x, y255, data_range=255.0).item() == pytest.approx(10 * np.log10(255.0**2 / mse), rel=1e-12)


# ---------------------------------------------------------------------------------------------- grid runner
class _RecordingFewstep:
    """Stands in for FewstepPipeline.from_pipe(...): latents drawn from each sample's own generator; the sample
    whose prompt is ``"nan"`` gets one NaN, ``"inf"`` one Inf (a partly diverged sample)."""

    calls: ClassVar[list] = []

    def __call__(self, prompt, generator, num_inference_steps, output_type, check_finite, **extra):
        type(self).calls.append((list(prompt), len(generator)))
        x = torch.stack([torch.randn(3, generator=g) for g in generator])
        for i, p in enumerate(prompt):
            if p in ("nan", "inf"):
                x[i, 1] = float(p)
        return types.SimpleNamespace(images=x)


def test_pipeline_world_seeds_prompts_and_diverged_count(monkeypatch):
    """Sample k of a pipeline directory: prompt ``prompts[k % P]`` (cycled), seed ``seed + k`` (batch-size
    independent); a sample with any NaN/Inf counts as diverged once, NaN replaced by 0 (run through
    ``_PipelineWorld.__init__``'s layout with the pipeline loading stubbed)."""
    import diffusers
    from _helpers import SD15_PNDM

    from fewstep.bench import runner
    from fewstep.pipelines import FewstepPipeline

    prompts = ["a", "nan", "inf"]
    config = types.SimpleNamespace(prompts=prompts, num_per_class=2, seed=5, image_size=None, batch_size=4,
                                   reference_images=None)

    class _Pipe:
        scheduler = types.SimpleNamespace(config=dict(SD15_PNDM))

        def set_progress_bar_config(self, **kw):
            pass

    monkeypatch.setattr(runner, "_folder_fingerprint", lambda model: "fp")
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(lambda cls, model: _Pipe()))
    monkeypatch.setattr(FewstepPipeline, "supports", staticmethod(lambda pipe: True))
    world = runner._PipelineWorld("pipe-dir", config, progress=False)
    assert world.prompts == ["a", "nan", "inf", "a", "nan", "inf"]
    assert world.seeds == [5, 6, 7, 8, 9, 10]
    monkeypatch.setattr(FewstepPipeline, "from_pipe", classmethod(lambda cls, pipe, **kw: _RecordingFewstep()))
    monkeypatch.setattr(FewstepPipeline, "family_of", staticmethod(lambda pipe: "sd"))
    _RecordingFewstep.calls = []
    latents, seconds, diverged = world.generate("ddim", 3, "cfg", 3.0)
    assert [len(p) for p, _ in _RecordingFewstep.calls] == [4, 2]  # batch_size 4
    want = torch.stack([torch.randn(3, generator=torch.Generator().manual_seed(5 + k)) for k in range(6)])
    want[[1, 4], 1] = 0.0  # NaN -> 0
    want[[2, 5], 1] = torch.finfo(torch.float32).max  # Inf -> the largest float (nan_to_num)
    torch.testing.assert_close(latents, want, rtol=0, atol=0)
    assert diverged == 4 and seconds >= 0


def test_pipeline_reference_solve_with_one_diverged_sample_is_refused():
    """A reference solve with any diverged sample (even one) is a FloatingPointError: every MSE of that setting
    would compare against replaced values."""
    from fewstep.bench import runner

    world = runner._PipelineWorld.__new__(runner._PipelineWorld)
    world.model, world.cache_dir, world.files_id, world.references = "pipe-dir", None, "fp", {}
    world.config = types.SimpleNamespace(prompts=["a"], num_per_class=3, seed=0, image_size=None,
                                         reference_sampler="ddim", reference_steps=4)
    world.generate = lambda *a: (torch.zeros(3, 2), 0.0, 1)
    with pytest.raises(FloatingPointError, match="1 of 3 samples hold NaN/Inf"):
        world.reference("cfg", 3.0)


def test_cell_metrics_are_mean_squared_errors_and_time_per_image():
    """Digits and pipeline rows: ``mse = mean (x - ref)^2`` over every element, ``seconds_per_image`` the wall time
    over the sample count, the digits NFE the scheduler's number of model calls (stubs for the models)."""
    from fewstep.bench import runner

    g = torch.Generator().manual_seed(0)
    images, ref = torch.rand(4, 1, 2, 2, generator=g), torch.rand(4, 1, 2, 2, generator=g, dtype=torch.float64)
    want = float(((images.double() - ref) ** 2).mean())
    world = runner._DigitsWorld.__new__(runner._DigitsWorld)
    world.extractor, world.references = None, {("cfg", 3.0): ref}
    world.objective = types.SimpleNamespace(model="digits-eps",
                                            model_config=runner._model_config("digits-eps", None),
                                            score=lambda x: (1.5, 0.25))
    world.generate = lambda sched, steps: (sched.set_timesteps(steps), (images, 2.0))[1]
    row = world.run(runner.Cell("digits-eps", "ddim", 3, "cfg", 3.0))
    assert row["mse"] == pytest.approx(want, rel=1e-12) and row["rmse"] is None
    assert (row["fd"], row["accuracy"], row["nfe"], row["num_samples"]) == (1.5, 0.25, 3, 4)
    assert row["seconds_per_image"] == pytest.approx(0.5)
    pworld = runner._PipelineWorld.__new__(runner._PipelineWorld)
    pworld.extractor, pworld.references = None, {("cfg", 3.0): ref}
    pworld.generate = lambda *a: (images, 2.0, 1)
    row = pworld.run(runner.Cell("pipe-dir", "ddim", 3, "cfg", 3.0))
    assert row["mse"] == pytest.approx(want, rel=1e-12)
    assert (row["seconds_per_image"], row["diverged"], row["num_samples"]) == (0.5, 1, 4)


def test_reference_statistics_use_only_the_test_digits_of_the_classes():
    """``mu``, ``C`` (unbiased) of the extractor's features of the held-out test digits of ``classes`` (in [0, 1],
    grey repeated over RGB), recomputed by hand."""
    from fewstep.bench.fid import FeatureExtractor
    from fewstep.bench.runner import reference_statistics

    def fn(x):  # channel means, and the mean of the top-left quarter: 4 features
        return torch.cat([x.mean(dim=(2, 3)), x[:, :1, :8, :8].mean(dim=(2, 3))], dim=1)

    mean, cov = reference_statistics("digits-eps", [3, 5], extractor=FeatureExtractor(fn, "test:quarters"))
    images, labels = load_digits_images(16, "test")
    x = ((images[(labels == 3) | (labels == 5)].double() + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1)
    f = fn(x).numpy()
    np.testing.assert_allclose(mean, f.mean(0), rtol=1e-6)  # float32 features
    np.testing.assert_allclose(cov, (f - f.mean(0)).T @ (f - f.mean(0)) / (len(f) - 1), rtol=1e-5, atol=1e-9)


def test_grid_cell_order_and_rule_default_scales():
    """``cells``: model, guidance, sampler, steps (steps vary fastest); ``parse_guidance("apg")`` takes the rule's
    default scale (7.5, as documented), ``"cfg++"`` 0.6, ``"cfgpp"`` the alias."""
    from fewstep.bench.runner import BenchConfig, parse_guidance

    config = BenchConfig(models=["digits-eps"], samplers=["ddim", "unipc"], steps=[2, 3],
                         guidance=[("cfg", 1.0), ("cfg", 3.0)])
    got = [(c.guidance_scale, c.sampler, c.steps) for c in config.cells()]
    assert got == [(s, n, k) for s in (1.0, 3.0) for n in ("ddim", "unipc") for k in (2, 3)]
    assert parse_guidance("apg") == ("apg", 7.5)
    assert parse_guidance("cfgpp") == ("cfg++", 0.6) and parse_guidance("cfg:2") == ("cfg", 2.0)


# ---------------------------------------------------------------------------------------------- reference images
def test_32_bit_integer_images_beyond_16_bit_are_refused_and_65535_is_white():
    """PIL mode ``I``: values 0..65535 scale by 1/65535 (65535 -> 1.0 exactly); 65536 has no known scale: refused.
    Mode ``F`` (float) images beyond [0, 1] by more than rounding are refused."""
    from PIL import Image

    from fewstep.bench.fid import _rgb01

    ok = Image.fromarray(np.array([[0, 65535], [32768, 1]], dtype=np.int32), mode="I")
    np.testing.assert_allclose(_rgb01(ok)[..., 0], np.array([[0, 65535], [32768, 1]]) / 65535.0, rtol=1e-7)
    bad = Image.fromarray(np.array([[0, 65536], [3, 1]], dtype=np.int32), mode="I")
    with pytest.raises(ValueError, match=r"only 0..65535"):
        _rgb01(bad)

    flt = Image.fromarray(np.array([[0.0, 1.0], [0.5, 1.001]], dtype=np.float32), mode="F")
    with pytest.raises(ValueError, match=r"float images must hold intensities in \[0, 1\]"):
        _rgb01(flt)  # 1e-3 beyond 1: far more than FLOAT_IMAGE_TOLERANCE (1e-6)

# ---------------------------------------------------------------------------------------------- CLI bounds
class _Stop(Exception):
    """Raised by a spy once the CLI has handed the library its arguments (nothing expensive runs)."""


_GEN = "fewstep.pipelines.generate.generate"
_EDIT = "fewstep.pipelines.flowchef.run_edit"
_TASK = "fewstep.pipelines.flowchef.run_task"
_POST = "fewstep.pipelines.posterior.run_inverse_task"
_GRID = "fewstep.bench.runner.run_grid"
_FLOW = ["generate", "--model", "digits-flow", "--num-images", "1", "--quiet"]


@pytest.mark.parametrize(("argv", "target", "message"), [
    # inclusive bounds the help/messages state: accepted at the bound ...
    ([*_FLOW, "--task", "edit", "--edit-size", "16", "--steps", "2"], _EDIT, None),
    ([*_FLOW, "--task", "edit", "--guidance-scale", "0", "--steps", "2"], _EDIT, None),
    ([*_FLOW, "--task", "inpaint", "--steps", "3", "--flowchef-steered-steps", "3"], _TASK, None),
    (["generate", "--num-images", "2", "--class", "3,7", "--quiet"], _GEN, None),
    (["generate", "--quiet"], _GEN, None),  # --out X.PNG: the suffix is case-insensitive (see below)
    # 9 / 0.009 = 1000.0000000000001 in floats: the 1000-step schedule of digits-eps, not 1001
    (["generate", "--task", "inpaint", "--posterior", "stsl", "--steps", "9", "--strength", "0.009", "--quiet"],
     _POST, None),
    (["bench", "--model", "digits-eps", "--steps", "2,20", "--reference-steps", "21", "--classes", "0",
      "--num-per-class", "2"], _GRID, None),
    # ... and refused one past it, exit code 2 with one line naming the flag
    ([*_FLOW, "--task", "edit", "--edit-size", "17", "--steps", "2"], _EDIT, "--edit-size must be <= 16"),
    ([*_FLOW, "--task", "inpaint", "--steps", "3", "--flowchef-steered-steps", "4"], _TASK,
     "--flowchef-steered-steps must be in 0..3"),
    (["generate", "--num-images", "2", "--class", "3,7,1", "--quiet"], _GEN, "lists 3 classes for 2 image(s)"),
    (["bench", "--model", "digits-eps", "--steps", "2,20", "--reference-steps", "20"], _GRID,
     "--reference-steps 20: the many-step reference solve needs more steps than the largest --steps (20)"),
    (["bench", "--model", "digits-eps", "--classes", "0", "--num-per-class", "1"], _GRID,
     "the digits metrics need at least 2 samples per cell"),
    # flags no requested model uses are refused, not silently ignored
    (["bench", "--classes", "1"], _GRID, "--classes applies to the digits models, not --model analytic"),
    (["bench", "--model", "digits-eps", "--dim", "3"], _GRID, "--dim applies to --model analytic"),
    (["bench", "--cache-dir", "c"], _GRID, "--cache-dir is for a grid run"),
])
def test_cli_bounds_and_ignored_flags(argv, target, message, monkeypatch, tmp_path, capsys):
    from fewstep.cli import main

    seen: dict = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(target, spy)
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / ("grid" if argv[0] == "bench" else "x.PNG"))] if "--cache-dir" not in argv else []
    if message is None:
        with pytest.raises(_Stop):
            main([*argv, *out])
    else:
        assert main([*argv, *out]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not seen and list(tmp_path.iterdir()) == []  # refused before any work: no output, no folder


def test_analytic_json_is_written_atomically(monkeypatch, tmp_path, capsys):
    """A disk that fills while --json is written: exit code 1, and neither the file nor a half-written one is left."""
    import pathlib

    from fewstep.cli import main

    real = pathlib.Path.write_text

    def failing(self, data, *args, **kwargs):
        real(self, data[:10], *args, **kwargs)  # some bytes land, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", failing)
    path = tmp_path / "bench.json"
    argv = ["bench", "--samplers", "ddim", "--steps", "2", "--num-samples", "2", "--quiet", "--json", str(path)]
    assert main(argv) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("argv", "ok"), [
    (["calibrate", "dc", "--out", "d.safetensors", "--guidance-scale", "0,7.5"], True),
    (["calibrate", "dc", "--out", "d.safetensors", "--guidance-scale", "1,inf"], False),
    (["calibrate", "dc", "--out", "d.safetensors", "--guidance-scale", "nan"], False),
    (["calibrate", "dc", "--out", "d.safetensors", "--guidance-scale", "3,-1"], False),
])
def test_guidance_scale_lists_are_finite_and_non_negative(argv, ok, capsys):
    """``calibrate dc --guidance-scale``: comma-separated finite numbers >= 0 (argparse's exit code 2 otherwise)."""
    from fewstep.cli import build_parser

    parser = build_parser([argv[0]])
    if ok:
        parser.parse_args(argv)
    else:
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2 and "expected finite numbers >= 0" in capsys.readouterr().err


def test_bench_config_bounds():
    """``classes``: distinct digits 0..9 (9 accepted, 10 refused); at least 2 digits samples per cell; a reference
    solve of >= 2 steps (the library API checks what the CLI checks)."""
    from fewstep.bench.runner import BenchConfig

    assert BenchConfig(models=["digits-eps"], classes=[9, 0]).classes == [9, 0]
    with pytest.raises(ValueError, match=r"`classes` must be distinct digits 0..9, got \[10\]"):
        BenchConfig(models=["digits-eps"], classes=[10])
    assert BenchConfig(models=["digits-eps"], classes=[0], num_per_class=2, reference_steps=2).reference_steps == 2
    with pytest.raises(ValueError, match="need at least 2 digits samples"):
        BenchConfig(models=["digits-eps"], classes=[0], num_per_class=1)
    with pytest.raises(ValueError, match=r"`reference_steps` must hold integers >= 2, got \[1\]"):
        BenchConfig(models=["digits-eps"], reference_steps=1)


def test_a_failed_flowchef_write_leaves_no_file(monkeypatch, tmp_path, capsys):
    """The FlowChef path writes its PNG atomically too: a disk that fills mid-write is exit code 1, no file left."""
    from PIL import Image

    from fewstep.cli import main

    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)  # the bytes land, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    argv = [*_FLOW, "--task", "inpaint", "--steps", "1", "--out", str(tmp_path / "x.png")]
    assert main(argv) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_num_images_other_than_the_measurement_tiles_is_refused(monkeypatch, tmp_path, capsys):
    """A 2-tile --measurement sets the count: --num-images 3 is a usage error (not silently ignored); 2 runs."""
    from PIL import Image

    from fewstep.cli import main

    path = tmp_path / "m.png"
    Image.fromarray(np.zeros((16, 32), dtype=np.uint8)).save(path)
    seen: dict = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(_GEN, spy)
    argv = ["generate", "--model", "digits-mr", "--measurement", str(path), "--quiet", "--out", str(tmp_path / "x.png")]
    assert main([*argv, "--num-images", "3"]) == 2
    err = capsys.readouterr().err
    assert "--num-images 3: --measurement holds 2 image(s)" in err and err.count("\n") == 1
    with pytest.raises(_Stop):
        main([*argv, "--num-images", "2"])
    assert seen["num_images"] == 2
