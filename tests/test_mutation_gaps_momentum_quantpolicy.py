"""Mutation-probe gaps in momentum samplers, the 8-bit execution policy and calibration-set building.

Each test compares with an independent reference: the formulas of Wizadwongsa et al. (2024) as written in the
docstrings / README (a plain float64 loop on the exact denoiser of a Gaussian mixture), a brute-force grouping of
layers by what decides their kernels, a scripted clock, or the PTQ4DM / Q-Diffusion recipes of the research notes
(NDTC: ``floor(N(mean T, std T))`` clamped, defaults mean = std = 0.4; Q-Diffusion: ``k`` steps every ``T / k``).
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

import fewstep
from fewstep import quant, samplers
from fewstep.bench.analytic import default_mixture
from fewstep.quant import calibration, policy
from fewstep.quant.quantizers import act_qparams_from_range
from fewstep.solvers.momentum import split_fractional_order

# ================================================================================================ momentum
MIX = default_mixture(dim=3, seed=4)
AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
# float64 end to end on an exact denoiser: only rounding separates the sampler from the loop below
TOL = {"rtol": 1e-9, "atol": 1e-10}


def _ghvb_weights(k: int, beta: float) -> list[float]:
    """GHVB-k weights (research notes sec. 1.5), newest first, all divided by beta."""
    row, den = {1: ([beta], 1.0), 2: ([2 + beta, -(2 - beta)], 2.0),
                3: ([18 + 5 * beta, -(24 - 8 * beta), 6 - beta], 12.0),
                4: ([46 + 9 * beta, -(78 - 19 * beta), 42 - 5 * beta, -(10 - beta)], 24.0)}[k]
    return [w / (den * beta) for w in row]


def _ddim_space_reference(grid, x, first, k, beta, mode):
    """Paper eq. 11 (hb over PLMS-k) / eq. 13 (ghvb) in DDIM space, started at grid point ``first`` with an empty
    history (img2img): the warm-up (order 1, ``v_0 = e_0``) restarts there."""
    a = [float(v) for v in grid.alphas]
    s = [float(v) for v in grid.sigmas]
    y = x / a[first]
    hist, v = [], None
    for i in range(first, len(a) - 1):
        _, eps = MIX.denoise(y * a[i], a[i], s[i])
        if mode == "hb":
            hist.append(eps)
            e = sum(w * hist[-1 - j] for j, w in enumerate(AB[min(k, len(hist))]))
            v = e if v is None else (1 - beta) * v + beta * e
            used = v
        else:
            v = eps if v is None else (1 - beta) * v + beta * eps
            hist.append(v)
            used = sum(w * hist[-1 - j] for j, w in enumerate(_ghvb_weights(min(k, len(hist)), beta)))
        y = y + (s[i + 1] / a[i + 1] - s[i] / a[i]) * used
    return y * a[-1]


@pytest.mark.parametrize(("name", "kwargs", "first"), [
    ("hb", {"base": "plms", "solver_order": 4, "beta": 0.7}, 2),
    ("hb", {"base": "plms", "solver_order": 3, "beta": 0.6}, 1),
    ("ghvb", {"solver_order": 3, "beta": 0.6}, 2),
    ("ghvb", {"solver_order": 4, "beta": 0.8}, 1),
])
def test_momentum_restarts_its_warm_up_at_the_img2img_begin_index(name, kwargs, first):
    """img2img: ``set_begin_index(k)`` starts the run at model call k with no history, so momentum's warm-up (order
    1, ``v = e`` on the first step) restarts there. Mutants that compiled the momentum from step 0 anyway (history
    expected before k) or skipped momentum on the start step survived the other tests."""
    steps = 7
    sched = samplers.get(name)(**kwargs)
    sched.set_timesteps(steps)
    sched.set_begin_index(first)
    grid = sched.plan.grid
    x0 = torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * float(grid.sigmas[first])
    x = x0
    for i in range(first, steps):
        _, eps = MIX.denoise(x, float(grid.alphas[i]), float(grid.sigmas[i]))
        x = sched.step(eps, sched.timesteps[i], x).prev_sample
    torch.testing.assert_close(x, _ddim_space_reference(grid, x0, first, kwargs["solver_order"], kwargs["beta"], name),
                               **TOL)


@pytest.mark.parametrize(("r", "expected"), [(0.97, (1, 0.97)), (2.99, (3, 0.99)), (4.96, (5, 0.96)),
                                             (1.001, (2, 0.001)), (3.0, (3, 1.0))])
def test_fractional_order_near_an_integer_keeps_its_fraction(r, expected):
    """``k = floor(r) + 1, beta = r - floor(r)`` for every non-integral r (notes sec. 1.5), however close to the next
    integer: 2.99 is PLMS-3 with beta 0.99, not PLMS-2 (beta 1)."""
    k, beta = split_fractional_order(r)
    assert k == expected[0] and beta == pytest.approx(expected[1], abs=1e-12)


# ================================================================================================ policy
def _ql(module: nn.Module) -> quant.QuantLayer:
    out = module.weight.shape[0]
    return quant.QuantLayer(module, [torch.full((out,), 0.01)], [act_qparams_from_range(-1, 1)])


class _Net(nn.Module):
    """Pairs of quantized layers that differ in exactly one thing that decides their kernel timings."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = _ql(nn.Linear(8, 8)), _ql(nn.Linear(8, 8))  # identical: one signature
        self.c = _ql(nn.Linear(8, 8))  # fed a smaller batch
        self.d = _ql(nn.Linear(8, 8, bias=False))
        self.e = _ql(nn.Linear(8, 6))  # another weight shape, same input
        self.f = _ql(nn.Conv2d(4, 4, 3, padding=1))
        self.g = _ql(nn.Conv2d(4, 4, 3, padding=1, stride=2))  # another conv geometry, same weight and input

    def forward(self, x, y):
        return (self.a(x), self.b(x), self.c(x[:2]), self.d(x), self.e(x), self.f(y), self.g(y))


def _net_inputs():
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(5, 8, generator=g), "y": torch.randn(2, 4, 6, 6, generator=g)}


def test_each_distinct_layer_configuration_is_timed_separately():
    """Brute-force reference: layers share a timing only when kind, weight shape, bias, conv geometry and input shape
    all agree (here only ``a`` and ``b``). Mutants that left the input shape, weight shape or conv stride out of
    ``layer_signature`` merged layers that run different GEMMs and survived the existing tests (which compared the
    policy with ``layer_signature`` itself)."""
    net, inputs = _Net(), _net_inputs()
    shapes = {"a": (5, 8), "b": (5, 8), "c": (2, 8), "d": (5, 8), "e": (5, 8), "f": (2, 4, 6, 6), "g": (2, 4, 6, 6)}
    config = {}
    for name, shape in shapes.items():
        m = getattr(net, name)
        conv = (m.conv["stride"], m.conv["padding"]) if m.kind == "conv2d" else ()
        config[name] = (m.kind, m.out_channels, m.in_channels, m.bias is not None, conv, shape)
    expected_groups = {frozenset(n for n in config if config[n] == c) for c in config.values()}
    assert len(expected_groups) == 6
    calls = []

    def timer(layer, x, mode):
        calls.append((layer, mode))
        return {"int8": 1.0, "dequant": 2.0}[mode]

    report = quant.choose_modes(net, inputs, candidates=("int8", "dequant"), timer=timer, apply=False)
    assert len(calls) == 2 * len(expected_groups)
    assert {r.name for r in report} == set(shapes) and all(r.chosen == "int8" for r in report)


@pytest.mark.parametrize(("int8", "margin", "expected"), [
    (2.0, None, "dequant"),  # a tie keeps float compute
    (1.99, None, "int8"),  # the default margin is 1: any real gain is taken
    (1.0, 2.0, "dequant"),  # exactly the margin: not "beats by the factor"
    (0.99, 2.0, "int8"),
])
def test_real_kernel_must_strictly_beat_dequant_by_the_margin(int8, margin, expected):
    """README / docstring: a real 8-bit mode is chosen when ``t_mode * margin < t_dequant``; ties keep ``dequant``;
    ``margin`` defaults to 1."""
    net = nn.Sequential(_ql(nn.Linear(8, 8)))
    kwargs = {} if margin is None else {"margin": margin}
    report = quant.choose_modes(net, {"input": torch.randn(3, 8)}, candidates=("int8", "dequant"),
                                timer=lambda layer, x, mode: {"int8": int8, "dequant": 2.0}[mode], **kwargs)
    assert [r.chosen for r in report] == [expected] and net[0].mode == expected


def test_margin_applies_against_dequant_whatever_else_is_a_candidate():
    """With ``dequant`` among the candidates it is the fallback the others must beat by the margin, also when
    ``int8`` is not a candidate (a mutant keyed the fallback on ``int8`` and then took the fastest mode)."""
    net = nn.Sequential(_ql(nn.Linear(8, 8)))
    report = quant.choose_modes(net, {"input": torch.randn(3, 8)}, candidates=("fake", "dequant"), margin=2.0,
                                timer=lambda layer, x, mode: {"fake": 1.5, "dequant": 2.0}[mode])
    assert [r.chosen for r in report] == ["dequant"]


def test_time_layer_is_the_median_of_the_repeats_after_the_warmup(monkeypatch):
    """A scripted clock: per-repeat durations 5, 1, 3, 100, 2 -> the median is 3 (numpy), not the mean or the
    minimum; the layer runs ``warmup + repeats`` times."""
    durations = [5.0, 1.0, 3.0, 100.0, 2.0]
    stamps = []
    t = 0.0
    for dur in durations:  # start, end of each repeat
        stamps += [t, t + dur]
        t += dur + 10.0
    ticks = iter(stamps)
    monkeypatch.setattr(policy, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    layer = _ql(nn.Linear(8, 8))
    runs = []
    layer.register_forward_pre_hook(lambda *_: runs.append(1))
    got = policy.time_layer(layer, torch.randn(2, 8), "dequant", repeats=5, warmup=3)
    assert got == float(np.median(durations)) == 3.0
    assert len(runs) == 3 + 5 and layer.mode == "fake"


def test_budget_stops_timing_once_the_clock_passes_it(monkeypatch):
    """A scripted clock that advances 1 s per timing: with 2 candidates per signature and ``budget=2.5``, the first
    signature ends at 2 s (< 2.5: go on), the second at 4 s (> 2.5: stop) -- exactly two signatures are timed."""
    clock = {"t": 0.0}
    monkeypatch.setattr(policy, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    net, inputs = _Net(), _net_inputs()

    def timer(layer, x, mode):
        clock["t"] += 1.0
        return {"int8": 1.0, "dequant": 2.0}[mode]

    report = quant.choose_modes(net, inputs, candidates=("int8", "dequant"), timer=timer, budget=2.5)
    timed = [r for r in report if r.seconds]
    assert clock["t"] == 4.0
    assert {frozenset(r.seconds) for r in timed} == {frozenset({"int8", "dequant"})}
    assert all(r.chosen == "dequant" for r in report if not r.seconds)


# ================================================================================================ calibration
@pytest.fixture(scope="module")
def pipe():
    return fewstep.load_default("digits-eps", sampler="ddim")


def test_ndtc_defaults_are_the_released_scripts_mean_and_std():
    """The NDTC script's defaults (notes: mean 0.4, std 0.4 of T): the default draws follow floor(N(0.4 T, 0.4 T))
    clamped to [0, T-1]. 200k draws over 10 bins: the binomial standard error of each frequency is <= 1.2e-3, so
    4e-3 is > 3 sigma, and a std of 0.35 moves the clamped end bins by >= 1.5e-2."""
    steps, n = 10, 200_000
    d = calibration.ndtc_indices(n, steps, generator=torch.Generator().manual_seed(5)).numpy()
    cdf = scipy.stats.norm(0.4 * steps, 0.4 * steps).cdf(np.arange(steps + 1, dtype=np.float64))
    probs = np.diff(cdf)
    probs[0] += cdf[0]
    probs[-1] += 1 - cdf[-1]
    np.testing.assert_allclose(np.bincount(d, minlength=steps) / n, probs, atol=4e-3)
    # the paper's bound mu <= T/2 is inclusive
    half = calibration.ndtc_indices(n, steps, mean=0.5, std=0.1, generator=torch.Generator().manual_seed(6))
    assert abs(float(half.double().mean()) - (0.5 * steps - 0.5)) < 0.02  # E[floor(N(5, 1))] = 4.5 (symmetry)


class _Recorder(nn.Module):
    def forward(self, sample, timestep, class_labels=None):
        return sample


def test_record_keeps_both_cfg_rows_only_for_a_cfg_batch():
    """Both CFG branches are kept where the network batch is ``[x; x]`` (same sample twice); an even batch of
    distinct samples is not a CFG batch and keeps just the rows asked for. A run with another number of denoiser
    calls than ``steps`` is an error."""
    model, steps = _Recorder(), 3
    plain = torch.arange(4.0).reshape(4, 1, 1, 1)  # four different samples, no guidance
    labels = torch.tensor([1, 2, 3, 4])

    def run_plain():
        for t in (900, 500, 100):
            model(plain, torch.tensor(t), class_labels=labels)

    recs = quant.record_denoiser_inputs(model, run_plain, steps, want=lambda d: torch.tensor([1]))
    assert [r["class_labels"].tolist() for r in recs] == [[2]] * steps
    assert [r["sample"].flatten().tolist() for r in recs] == [[1.0]] * steps
    assert [r["timestep"].tolist() for r in recs] == [[900], [500], [100]]

    cfg = torch.cat([plain[:2], plain[:2]])
    cfg_labels = torch.tensor([1, 2, 10, 10])  # 10: the null class

    def run_cfg():
        for t in (900, 500, 100):
            model(cfg, torch.tensor(t), class_labels=cfg_labels)

    recs = quant.record_denoiser_inputs(model, run_cfg, steps, want=lambda d: torch.tensor([1]) if d == 0 else None)
    assert len(recs) == 1 and recs[0]["class_labels"].tolist() == [2, 10] and recs[0]["timestep"].tolist() == [100, 100]
    with pytest.raises(ValueError, match="called the denoiser 3 times, expected `steps`=2"):
        quant.record_denoiser_inputs(model, run_cfg, 2, want=lambda d: None)


def test_build_calibration_set_defaults(pipe):
    """Defaults: NDTC (mean 0.4, std 0.4) at CFG 3.0, so both CFG rows of every sample are kept."""
    cal = quant.build_calibration_set(pipe, num_samples=2, steps=3)
    assert cal.settings["method"] == "ndtc" and cal.settings["guidance_scale"] == 3.0
    assert (cal.settings["ndtc_mean"], cal.settings["ndtc_std"]) == (0.4, 0.4)
    assert len(cal) == 4 and int((cal.class_labels == pipe.null_class).sum()) == 2


def test_uniform_calibration_rounds_trajectories_up_and_keeps_twenty_steps_by_default(pipe):
    """Q-Diffusion: ``ceil(num_samples / k)`` trajectories recorded at each of ``k`` steps ``floor(j T / k)``;
    ``k`` defaults to ``min(T, 20)``."""
    cal = quant.build_calibration_set(pipe, num_samples=7, steps=3, method="uniform", num_steps_kept=3, seed=2)
    assert len(cal) == math.ceil(7 / 3) * 3 * 2
    cal = quant.build_calibration_set(pipe, num_samples=1, steps=21, method="uniform", seed=2)
    assert cal.settings["num_steps_kept"] == 20
    assert sorted(set(cal.diffusion_index.tolist())) == [j * 21 // 20 for j in range(20)]


def test_ndtc_calibration_is_seeded_cycles_labels_and_uses_every_draw_across_batches(pipe):
    """Each trajectory is recorded once at its own draw (the NDTC draws of the seed, in every batch), labels cycle
    through ``classes``, and the same seed gives the same set (the noise comes from the seeded generator)."""
    kwargs = {"num_samples": 6, "steps": 3, "method": "ndtc", "classes": [3, 5, 7], "seed": 3, "batch_size": 2}
    cal = quant.build_calibration_set(pipe, **kwargs)
    cond = cal.class_labels != pipe.null_class
    draws = calibration.ndtc_indices(6, 3, generator=torch.Generator().manual_seed(3))
    assert sorted(cal.diffusion_index[cond].tolist()) == sorted(draws.tolist())
    assert sorted(draws.tolist()) != sorted(draws[:2].tolist() * 3)  # reusing the first batch's draws would show
    assert sorted(cal.class_labels[cond].tolist()) == [3, 3, 5, 5, 7, 7]
    one, again = (quant.build_calibration_set(pipe, num_samples=3, steps=3, classes=[3, 5, 7], seed=11) for _ in "ab")
    assert sorted(one.class_labels[one.class_labels != pipe.null_class].tolist()) == [3, 5, 7]
    torch.testing.assert_close(again.sample, one.sample, rtol=0, atol=0)
