"""DC-Solver: compensation hook, scheduler parity at rho = 1, ratio search, artifacts, CPR and bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from _helpers import REAL_CONFIGS, TinyDenoiser
from diffusers import DDPMScheduler
from test_real_pipeline import tiny_sd  # noqa: F401 - fixture reused by the SD calibration test

from fewstep import samplers
from fewstep.cli import main
from fewstep.samplers.dc_solver import dc_scheduler_key
from fewstep.solvers import VPSchedule, grids
from fewstep.solvers.dc import (
    DynamicCompensation,
    compile_dc,
    compile_dc_plan,
    dc_step,
    interpolation_values,
    lagrange_weights,
)
from fewstep.solvers.dc_artifacts import (
    CPRModel,
    RatioEntry,
    cpr_features,
    fit_cpr,
    load_cpr,
    load_ratio_table,
    load_ratios,
    save_cpr,
    save_ratio_table,
)
from fewstep.solvers.engine import EngineState, Evaluation
from fewstep.solvers.methods import unipc_decisions

DC = samplers.get("dc-solver")


def _loop(scheduler, steps: int, seed: int = 1) -> torch.Tensor:
    model = TinyDenoiser(3 * 8 * 8)
    scheduler.set_timesteps(steps)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


# ------------------------------------------------------------------------------------------ parity at rho = 1
PARITY = [
    ("unipc", {"solver_order": 2}),
    ("unipc", {"solver_order": 3, "timestep_spacing": "trailing"}),
    ("unipc", {"solver_order": 2, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("unipc", {"solver_order": 2, "predict_x0": False, "final_sigmas_type": "sigma_min"}),
    ("unipc", {"solver_order": 2, "disable_corrector": [0, 2], "prediction_type": "v_prediction"}),
    ("ddim", {"timestep_spacing": "leading", "steps_offset": 1, "clip_sample": True}),
    ("dpm-solver++", {"solver_order": 2}),
    ("dpm-solver++", {"solver_order": 3, "timestep_spacing": "trailing"}),
]


@pytest.mark.parametrize("steps", [5, 9])
@pytest.mark.parametrize("base,kwargs", PARITY)
def test_unit_ratios_reproduce_the_base_solver_exactly(base, kwargs, steps):
    reference = _loop(samplers.get(base)(**kwargs), steps)
    dc = DC(dc_base=base, dc_ratios=[1.0] * steps, **kwargs)
    got = _loop(dc, steps)
    assert torch.equal(got, reference)
    assert dc.plan.buffer_size >= 3  # the K = 2 interpolation really ran (its weights are exactly 1, 0, 0)


@pytest.mark.parametrize("steps", [6, 20])
@pytest.mark.parametrize("kwargs", [
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min"},
    {"euler_at_final": True, "final_sigmas_type": "sigma_min"},
])
def test_unit_ratios_reproduce_dpm_solver_with_its_own_options(kwargs, steps):
    """Found by a probe: dc-solver dropped DPM-Solver's ``algorithm_type`` and ``euler_at_final`` (ratios 1 were
    1.7% / 3.2% off dpm-solver++ on the same config)."""
    config = samplers.get("dpm-solver++")(**kwargs).config
    reference = _loop(samplers.get("dpm-solver++").from_config(config), steps)
    dc = samplers.from_config("dc-solver", config, dc_base="dpm-solver++", dc_ratios=[1.0] * steps)
    assert torch.equal(_loop(dc, steps), reference)
    if steps == 20:  # euler_at_final changes nothing below 15 steps (the last step is first order anyway)
        without = {k: v for k, v in kwargs.items() if k in ("final_sigmas_type", "solver_order")}
        assert not torch.equal(_loop(samplers.get("dpm-solver++")(**without), steps), reference)


def test_dpm_solver_base_options_are_checked_and_keyed():
    with pytest.raises(ValueError, match=r"`predict_x0`=False is UniPC's noise-form switch; with "
                                         r"dc_base='dpm-solver\+\+' .*algorithm_type='dpmsolver'"):
        DC(dc_base="dpm-solver++", predict_x0=False)
    with pytest.raises(ValueError, match=r"`euler_at_final` must be True or False, got 'yes'"):
        DC(euler_at_final="yes")
    # defaults leave the artifact key as before (the shipped tables keep loading); other values are part of it
    assert "algorithm_type" not in _key() and "euler_at_final" not in _key()
    assert _key(dc_base="dpm-solver++", algorithm_type="dpmsolver")["algorithm_type"] == "dpmsolver"
    assert _key(dc_base="dpm-solver++", euler_at_final=True)["euler_at_final"] is True
    assert "algorithm_type" not in _key(algorithm_type="dpmsolver")  # not an option of the UniPC base
    # a UniPC base ignores DPM-Solver's keys (as keys of a foreign config are), SDE ones included
    assert torch.equal(_loop(DC(algorithm_type="sde-dpmsolver++", dc_ratios=[1.0] * 5), 5),
                       _loop(DC(dc_ratios=[1.0] * 5), 5))


@pytest.mark.parametrize("base", ["unipc", "ddim", "dpm-solver++"])
def test_other_ratios_change_the_result(base):
    """Unlike a 'DC' whose compensation is commented out, rho != 1 must move the sample."""
    reference = _loop(DC(dc_base=base, dc_ratios=[1.0] * 6), 6)
    got = _loop(DC(dc_base=base, dc_ratios=[1, 1, 1.1, 1.1, 1.1, 1.1]), 6)
    assert ((got - reference).norm() / reference.norm()).item() > 1e-3


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd21"])
def test_from_real_configs(name):
    cfg = REAL_CONFIGS[name]
    dc = DC.from_config(cfg, dc_ratios=[1, 1, 1.05, 1.02, 0.98, 1.0])
    unipc = samplers.get("unipc").from_config(cfg)
    dc.set_timesteps(6)
    unipc.set_timesteps(6)
    assert torch.equal(dc.timesteps, unipc.timesteps)
    assert dc.dc_ratios_used == [1, 1, 1.05, 1.02, 0.98, 1.0]


def test_config_round_trip_keeps_the_ratios(tmp_path):
    dc = DC(dc_ratios=[1, 1, 1.1, 0.9, 1.2], dc_variable="lambda", dc_base="dpm-solver++")
    dc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["dc_ratios"] == [1.0, 1.0, 1.1, 0.9, 1.2]
    loaded = DC.from_pretrained(tmp_path)
    assert torch.equal(_loop(loaded, 5), _loop(dc, 5))


# ------------------------------------------------------------------------------------------ interpolation
@pytest.mark.parametrize("order", [1, 2, 3])
def test_lagrange_weights_are_exact_on_polynomials(order):
    rng = np.random.default_rng(order)
    nodes = [1.0, 0.0] + sorted((-rng.uniform(0.3, 3.0, size=order - 1)).tolist())
    coeffs = rng.normal(size=order + 1)
    poly = lambda u: sum(c * u**k for k, c in enumerate(coeffs))  # noqa: E731
    for rho in (1.0, 0.7, 1.3, 2.0):
        w = lagrange_weights(nodes, rho)
        assert abs(sum(wk * poly(uk) for wk, uk in zip(w, nodes)) - poly(rho)) < 1e-10
    assert lagrange_weights(nodes, 1.0) == [1.0] + [0.0] * order


def test_weights_are_differentiable_in_rho_and_match_the_float_version():
    nodes = [1.0, 0.0, -1.4]
    rho = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    w = lagrange_weights(nodes, rho)
    assert [float(v.detach()) for v in w] == pytest.approx(lagrange_weights(nodes, 1.2), abs=1e-15)
    w[2].backward()
    eps = 1e-6
    fd = (lagrange_weights(nodes, 1.2 + eps)[2] - lagrange_weights(nodes, 1.2 - eps)[2]) / (2 * eps)
    assert rho.grad.item() == pytest.approx(fd, rel=1e-7)


@pytest.mark.parametrize("variable", ["t", "lambda", "sigma"])
@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_hook_interpolates_the_buffered_field_at_the_shifted_time(variable, prediction):
    """Buffer fields that are quadratic in the interpolation variable are reproduced exactly at tau."""
    grid = grids.spacing_grid(VPSchedule.from_config(DDPMScheduler().config), 8)
    decisions = unipc_decisions(8, prediction=prediction)
    plan = compile_dc_plan(grid, decisions, order=2)
    v = interpolation_values(grid, variable)
    scale = float(np.max(np.abs(v)))
    base, lin, quad = (
        torch.randn(3, 4, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(3)
    )
    field = lambda s: base + lin * (s / scale) + quad * (s / scale) ** 2  # noqa: E731
    i, rho = 5, 1.3
    state = EngineState(plan)
    for j in range(i - 2, i + 1):
        x_eval = torch.randn(3, 4, dtype=torch.float64)
        f = field(v[j])
        other = torch.randn(3, 4, dtype=torch.float64)
        state.buffer.append(Evaluation(x_eval, f, other) if prediction == "data" else Evaluation(x_eval, other, f))
    before = state.buffer[-1]
    table = compile_dc(plan, [1, 1, 1, 1, 1, rho, 1, 1], order=2, variable=variable)
    DynamicCompensation(table)(state, i)
    after = state.buffer[-1]
    tau = v[i - 1] + rho * (v[i] - v[i - 1])
    torch.testing.assert_close(after.field(prediction), field(tau), rtol=1e-10, atol=1e-10)
    a, s = grid.alphas[i], grid.sigmas[i]
    torch.testing.assert_close(a * after.x0 + s * after.eps, a * before.x0 + s * before.eps, rtol=1e-12, atol=1e-12)
    assert after.x_eval is before.x_eval


# ------------------------------------------------------------------------------------------ search (analytic)
def test_search_reduces_the_error_against_the_exact_solution():
    from fewstep.bench.analytic import AnalyticModel, default_mixture, exact_solution
    from fewstep.calibrate.dc import exact_reference_states, search_ratios

    mixture = default_mixture(dim=4, seed=0)
    cfg = dict(DDPMScheduler(timestep_spacing="trailing").config)
    nfe = 5
    sched = DC.from_config(cfg, dc_ratios=[1.0] * nfe)
    sched.set_timesteps(nfe)
    model = AnalyticModel(mixture, sched.noise_schedule)
    x_train = torch.randn(10, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = exact_reference_states(mixture, sched.noise_schedule, sched.plan.grid, x_train)
    result = search_ratios(sched.plan, lambda x, t: model(x, t), "epsilon", x_train, targets, progress=False)
    assert result.ratios[:2] == [1.0, 1.0] and result.ratios != [1.0] * nfe
    assert all(dc <= base for dc, base in zip(result.step_loss_dc[2:], result.step_loss_base[2:]))

    x_test = torch.randn(200, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = exact_solution(mixture, sched.noise_schedule, x_test, float(sched.plan.grid.timesteps[0]))

    def mse(ratios):
        s = DC.from_config(cfg, dc_ratios=ratios)
        s.set_timesteps(nfe)
        x = x_test
        for t in s.timesteps:
            x = s.step(model(x, t), t, x).prev_sample
        return ((x - exact) ** 2).mean().item()

    assert mse(result.ratios) < 0.8 * mse([1.0] * nfe)

    final = search_ratios(
        sched.plan, lambda x, t: model(x, t), "epsilon", x_train, targets, progress=False, objective="final", iters=10
    )
    assert mse(final.ratios) < mse([1.0] * nfe)
    with pytest.raises(ValueError, match=r"`objective` must be one of \['next', 'final'\], got 'end'"):
        search_ratios(sched.plan, lambda x, t: model(x, t), "epsilon", x_train, targets, objective="end")


def test_fine_reference_grid_contains_the_coarse_points():
    from fewstep.calibrate.dc import fine_grid

    schedule = VPSchedule.from_config(DDPMScheduler().config)
    coarse = grids.spacing_grid(schedule, 5, "trailing")
    fine, index = fine_grid(schedule, coarse, 40)
    for i, f in enumerate(index):
        assert fine.alphas[f] == pytest.approx(coarse.alphas[i + 1], abs=1e-12)
    assert fine.num_steps >= 40 and fine.sigmas[-1] == 0.0


# ------------------------------------------------------------------------------------------ artifacts / CPR
def _key(**over):
    return dc_scheduler_key(DC(**over).config)


def test_ratio_table_round_trip_and_scheduler_loading(tmp_path):
    key = _key()
    entries = [RatioEntry(5, 3.0, [1, 1, 1.1, 0.95, 1.2]), RatioEntry(6, 3.0, [1, 1, 1.1, 1.0, 0.9, 1.3])]
    path = save_ratio_table(tmp_path / "r.safetensors", entries, "toy", key)
    assert load_ratios(path, "toy", key, 6, 3.0) == [1, 1, 1.1, 1.0, 0.9, 1.3]
    from_file = DC(dc_ratios_file=str(path), dc_model="toy", dc_guidance_scale=3.0)
    explicit = DC(dc_ratios=[1, 1, 1.1, 0.95, 1.2])
    assert torch.equal(_loop(from_file, 5), _loop(explicit, 5))

    with pytest.raises(ValueError, match=r"no ratios for NFE 7 .* holds \(NFE 5, CFG 3\), \(NFE 6, CFG 3\)"):
        from_file.set_timesteps(7)
    with pytest.raises(ValueError, match="guidance scale 7"):
        DC(dc_ratios_file=str(path), dc_model="toy", dc_guidance_scale=7.0).set_timesteps(5)
    with pytest.raises(ValueError, match="for model 'toy', not 'digits-eps'"):
        DC(dc_ratios_file=str(path), dc_model="digits-eps", dc_guidance_scale=3.0).set_timesteps(5)
    with pytest.raises(ValueError, match="dc_variable: file 't' vs scheduler 'lambda'"):
        DC(dc_ratios_file=str(path), dc_model="toy", dc_guidance_scale=3.0, dc_variable="lambda").set_timesteps(5)


def test_cpr_recovers_a_cascade_polynomial_and_warns_outside_its_range(tmp_path):
    truth = CPRModel(np.random.default_rng(0).normal(scale=0.05, size=36) + np.eye(36)[0])
    entries = [RatioEntry(n, g, truth.predict(n, g, warn=False)) for n in (5, 6, 8, 10, 12) for g in (1.0, 3.0, 7.0)]
    cpr = fit_cpr(entries, ridge=0.0)
    assert cpr.predict(7, 5.0) == pytest.approx(truth.predict(7, 5.0, warn=False), abs=1e-8)
    assert cpr.nfe_range == (5, 12) and cpr.guidance_range == (1.0, 7.0)
    with pytest.warns(UserWarning, match=r"NFE 15, 3 above its fitted range \[5, 12\]"):
        cpr.predict(15, 3.0)
    with pytest.warns(UserWarning, match=r"guidance scale 0.5, 0.5 below"):
        cpr.predict(6, 0.5)
    # found by probing: far outside its range the shipped CPR gives negative ratios (tau before the previous
    # point), which ran with a warning only; that is an error now
    from fewstep.samplers.dc_solver import shipped_artifact

    shipped = load_cpr(shipped_artifact("digits-eps", "cpr"))
    with pytest.warns(UserWarning):
        assert min(shipped.predict(20, 3.0)) < 0 < min(shipped.predict(12, 3.0))
    import fewstep

    config = fewstep.load_default("digits-eps").scheduler.config
    dc = samplers.from_config("dc-solver", config, dc_cpr="digits-eps", dc_model="digits-eps", dc_guidance_scale=3.0)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"CPR predicts ratios <= 0 for NFE 20, CFG 3"):
        dc.set_timesteps(20)

    key = _key()
    path = save_cpr(tmp_path / "c.safetensors", cpr, "toy", key)
    loaded = load_cpr(path, "toy", key)
    assert loaded.predict(7, 5.0) == pytest.approx(cpr.predict(7, 5.0), abs=1e-12)
    with pytest.raises(ValueError, match="not 'other'"):
        load_cpr(path, "other", key)
    sched = DC(dc_cpr=str(path), dc_model="toy", dc_guidance_scale=5.0)
    sched.set_timesteps(7)
    assert sched.dc_ratios_used == pytest.approx(cpr.predict(7, 5.0))
    listed = DC(dc_cpr=cpr.coefficients.reshape(-1).tolist(), dc_guidance_scale=5.0)
    listed.set_timesteps(7)
    assert listed.dc_ratios_used == sched.dc_ratios_used
    assert cpr_features(5, 3.0, 2).shape == (36,)


def test_shipped_digits_artifacts_load_and_compensate():
    from fewstep.pipelines.defaults import default_model_path

    cfg = json.loads((default_model_path("digits-eps") / "scheduler" / "scheduler_config.json").read_text())
    for source in ({"dc_ratios_file": "digits-eps"}, {"dc_cpr": "digits-eps"}):
        sched = DC.from_config(cfg, dc_model="digits-eps", dc_guidance_scale=3.0, **source)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # NFE 5 / CFG 3 lies inside the fitted range
            sched.set_timesteps(5)
        assert sched.dc_ratios_used[:2] == [1.0, 1.0] and sched.dc_ratios_used != [1.0] * 5


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs,steps,match",
    [
        ({"dc_ratios": [1, 1, 1.1]}, 5, r"`dc_ratios` has 3 entries but the sampler runs 5 steps"),
        ({"dc_ratios": [1, 1.2, 1, 1, 1]}, 5, r"`dc_ratios`\[1\] = 1.2: interpolation order K=2 needs K\+1=3 buffered"),
        ({"dc_ratios": [1, 1, float("nan"), 1, 1]}, 5, "must be finite"),
    ],
)
def test_bad_ratio_lists(kwargs, steps, match):
    with pytest.raises(ValueError, match=match):
        DC(**kwargs).set_timesteps(steps)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dc_base": "euler"}, r"`dc_base` must be one of \['unipc', 'ddim', 'dpm-solver\+\+'\], got 'euler'"),
        ({"dc_variable": "rho"}, r"`dc_variable` must be one of \['t', 'lambda', 'sigma'\], got 'rho'"),
        ({"dc_order": 4}, r"`dc_order` must be an integer in \[1, 3\], got 4"),
        ({"dc_ratios": [1.0], "dc_cpr": [0.0] * 36}, "pass only one of"),
        ({"dc_ratios_file": "x.safetensors", "dc_guidance_scale": 3.0}, "`dc_model` must name the model"),
        ({"dc_cpr": "digits-eps", "dc_guidance_scale": 3.0}, "`dc_model` must name the model"),
        ({"dc_cpr": [0.0] * 36}, "`dc_guidance_scale` must be given"),
        ({"dc_cpr": [0.0] * 35, "dc_guidance_scale": 1.0}, "36 finite numbers"),
        ({"dc_guidance_scale": float("inf")}, "`dc_guidance_scale` must be a finite number"),
    ],
)
def test_bad_scheduler_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DC(**kwargs)


def test_missing_artifact_and_too_few_buffered_points(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DC(dc_ratios_file=str(tmp_path / "none.safetensors"), dc_model="m", dc_guidance_scale=1.0)
    grid = grids.spacing_grid(VPSchedule.from_config(DDPMScheduler().config), 6)
    plan = compile_dc_plan(grid, unipc_decisions(6), order=2)
    state = EngineState(plan)
    state.buffer = [Evaluation(*(torch.zeros(2),) * 3)] * 2
    hook = DynamicCompensation([None, None, None, dc_step(grid, plan.decisions[3], 3, 1.1)] + [None] * 2)
    with pytest.raises(ValueError, match="order K=2 needs 3 buffered outputs, the buffer holds 2"):
        hook(state, 3)
    with pytest.raises(ValueError, match="`nodes` must be distinct"):
        lagrange_weights([1.0, 0.0, 0.0], 1.1)


def test_cli_calibrate_dc_end_to_end_and_usage_errors(tmp_path, capsys):
    out, cpr = tmp_path / "r.safetensors", tmp_path / "c.safetensors"
    argv = [
        "calibrate",
        "dc",
        "--nfe",
        "3,4",
        "--guidance-scale",
        "3",
        "--datapoints",
        "2",
        "--iters",
        "2",
        "--reference",
        "ddim:8",
        "--out",
        str(out),
        "--cpr-out",
        str(cpr),
        "--quiet",
    ]
    assert main(argv) == 0
    entries, info = load_ratio_table(out)
    assert info["model"] == "digits-eps" and [(e.nfe, len(e.ratios)) for e in entries] == [(3, 3), (4, 4)]
    assert load_cpr(cpr).fitted_on == [(3, 3.0), (4, 3.0)]
    capsys.readouterr()
    assert main(["calibrate", "dc", "--reference", "euler:5", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "`reference` must be 'exact' or METHOD:STEPS" in capsys.readouterr().err
    assert main(["calibrate", "dc", "--out", str(tmp_path / "missing" / "x.safetensors")]) == 2
    code = main(["calibrate", "dc", "--nfe", "2", "--out", str(out)])  # a usage error: main returns 2 (argparse's too)
    assert code == 2
    capsys.readouterr()
    x = str(tmp_path / "x.safetensors")
    for argv, message in (
        (["--out", x, "--cpr-out", x], "--cpr-out '" + x + "' is the --out file"),
        (["--nfe", "3,3", "--out", x], "--nfe: '3,3' repeats 3; give each value once"),
        (["--guidance-scale", "1,1.0", "--out", x], "--guidance-scale: '1,1.0' repeats 1"),
        (["--nfe", "5", "--reference", "ddim:4", "--out", x], "--reference ddim:4: the reference solve needs at least"),
    ):
        try:
            code = main(["calibrate", "dc", *argv])
        except SystemExit as exc:  # argparse's own usage errors (a list flag's type)
            code = exc.code
        assert code == 2, argv
        assert message in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_cli_defaults_dc_guidance_scale_and_model_to_the_run(tmp_path, capsys, monkeypatch):
    from fewstep import cli
    from fewstep.pipelines import generate as generate_module

    seen = {}
    real = generate_module.load_model

    def spy(model, sampler, device="auto", dtype="float32", sampler_options=None):
        seen.update(sampler_options or {})
        return real(model, sampler, device=device, dtype=dtype, sampler_options=sampler_options)

    monkeypatch.setattr(generate_module, "load_model", spy)
    out = tmp_path / "dc.png"
    argv = ["generate", "--sampler", "dc-solver", "--sampler-option", "dc_cpr=digits-eps", "--guidance-scale", "3",
            "--steps", "5", "--num-images", "2", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0 and out.is_file()
    assert seen["dc_guidance_scale"] == 3.0 and seen["dc_model"] == "digits-eps"


def test_calibration_on_a_text_to_image_pipeline(tiny_sd):  # noqa: F811 - the fixture imported above
    """The paper calibrates SD with (noise, prompt) datapoints: the same search on a tiny SD 1.x pipeline."""
    from diffusers import StableDiffusionPipeline

    from fewstep.calibrate.dc import calibrate_text_to_image

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    entries, key = calibrate_text_to_image(
        pipe, ["a red square", "a blue circle"], nfes=[4], guidance_scales=[3.0], datapoints=3,
        reference="ddim:20", iters=5, progress=False,
    )
    assert len(entries) == 1 and entries[0].nfe == 4 and len(entries[0].ratios) == 4
    assert key and entries[0].info["prompts"] == 2
    assert entries[0].ratios != [1.0] * 4  # the search moved the ratios
    with pytest.raises(ValueError, match="`prompts` must hold at least one prompt"):
        calibrate_text_to_image(pipe, [], nfes=[4], guidance_scales=[3.0])
    with pytest.raises(ValueError, match="`nfes` must be a non-empty list"):
        calibrate_text_to_image(pipe, ["x"], nfes=[], guidance_scales=[3.0])


def test_cli_calibrates_a_text_to_image_pipeline(tiny_sd, tmp_path, capsys):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\na blue circle\n")
    out = tmp_path / "ratios.safetensors"
    argv = ["calibrate", "dc", "--model", str(tiny_sd), "--prompts", str(prompts), "--nfe", "4", "--guidance-scale",
            "3", "--datapoints", "2", "--reference", "ddim:12", "--iters", "2", "--quiet", "--out", str(out)]
    assert main(argv) == 0 and out.is_file()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    argv[argv.index(str(prompts))] = str(empty)
    argv[-1] = str(tmp_path / "bad.safetensors")
    assert main(argv) == 2
    assert "holds no prompt" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_released_cpr_coefficients_give_the_released_ratios():
    """DC-Solver's released CPR evaluation (nested quadratics in NFE/50 then CFG/12, highest power first, then a
    cubic in step/NFE; ratio 1 for the first two steps), written out here, equals fewstep's CPR on the converted
    coefficients; unconverted they differ."""
    from fewstep.solvers.dc_artifacts import CPRModel, cpr_from_released

    rng = np.random.default_rng(0)
    released = rng.normal(size=36) * 0.1
    released[0] = 1.0

    def released_ratio(cfg, nfe, step):
        c = released.reshape(4, 3, 3)
        n, g, x = nfe / 50, cfg / 12, step / nfe
        by_nfe = c[..., 0] * n**2 + c[..., 1] * n + c[..., 2]  # (4, 3)
        by_cfg = by_nfe[:, 0] * g**2 + by_nfe[:, 1] * g + by_nfe[:, 2]  # (4,)
        return sum(by_cfg[k] * x**k for k in range(4))

    for cfg, nfe in ((7.5, 6), (3.0, 10), (12.0, 5)):
        expected = [1.0 if step < 3 else released_ratio(cfg, nfe, step) for step in range(1, nfe + 1)]
        got = CPRModel(cpr_from_released(released), order=2).predict(nfe, cfg, warn=False)
        np.testing.assert_allclose(got, expected, rtol=1e-12)
        assert not np.allclose(CPRModel(released, order=2).predict(nfe, cfg, warn=False), expected)
    with pytest.raises(ValueError, match="released CPR `coefficients` must be 36 finite numbers, got 35"):
        cpr_from_released(released[:35])


def test_shipped_ratios_are_refused_on_a_custom_grid():
    """Found by probing: ratios searched on 999, 799, ... were applied silently to any custom timesteps."""
    from fewstep import samplers
    from fewstep.pipelines.defaults import default_model_path

    config = json.loads((default_model_path("digits-eps") / "scheduler" / "scheduler_config.json").read_text())
    for options in ({"dc_ratios_file": "digits-eps"}, {"dc_cpr": "digits-eps"}):
        sched = samplers.get("dc-solver").from_config(config, dc_model="digits-eps", dc_guidance_scale=3.0, **options)
        with pytest.raises(ValueError, match="were searched on the config's own grid"):
            sched.set_timesteps(timesteps=[999, 500, 100, 50, 10])
        sched.set_timesteps(5)  # its own grid: fine


# ------------------------------------------------------------------------------------------ malformed artifacts
def _rewrite(src, dst, tensors=None, header=None):
    """``src`` written again as ``dst`` with some tensors / metadata fields replaced (``None`` values drop them)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta, data = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    data.update(tensors or {})
    meta.update(header or {})
    save_file({k: v.contiguous() for k, v in data.items() if v is not None}, str(dst),
              metadata={k: v for k, v in meta.items() if v is not None})
    return dst


def _table(tmp_path):
    entries = [RatioEntry(5, 3.0, [1, 1, 1.1, 0.95, 1.2]), RatioEntry(6, 3.0, [1, 1, 1.1, 1.0, 0.9, 1.3])]
    return save_ratio_table(tmp_path / "good.safetensors", entries, "toy", _key(), {"version": "x"})


@pytest.mark.parametrize(
    "tensors, header, match",
    [
        # found by probing: KeyError, JSONDecodeError, float() TypeError instead of a message naming the file
        (None, {"entries": None}, r"metadata field 'entries' is missing"),
        (None, {"entries": "[{"}, r"metadata field 'entries' is not valid JSON"),
        (None, {"entries": "{}"}, r"'entries' must be a non-empty JSON list"),
        (None, {"model": None}, r"metadata field 'model' is missing"),
        (None, {"extra": None}, r"metadata field 'extra' is missing"),
        (None, {"scheduler": "nope"}, r"metadata field 'scheduler' is not valid JSON"),
        (None, {"scheduler": "[1]"}, r"metadata field 'scheduler' must be a JSON object"),
        ({"nfe6_cfg3": None}, None, r"entry 1: 'key' 'nfe6_cfg3' names no tensor of the file"),
        ({"nfe6_cfg3": torch.ones(2, 3, dtype=torch.float64)}, None, r"tensor 'nfe6_cfg3' must be 1-D, got shape"),
        ({"nfe6_cfg3": torch.ones(6, dtype=torch.complex64)}, None, r"tensor 'nfe6_cfg3' has dtype complex64; it must "
         r"hold real floating-point numbers"),
        ({"nfe6_cfg3": torch.ones(6, dtype=torch.bool)}, None, r"has dtype bool"),
        ({"nfe6_cfg3": torch.ones(7, dtype=torch.float64)}, None, r"entry 1 \('nfe6_cfg3'\): 7 ratios for NFE 6"),
        (None, {"entries": json.dumps([{"key": "nfe6_cfg3", "nfe": "6", "guidance_scale": 3.0}])},
         r"entry 0: 'nfe' must be an integer >= 1, got '6'"),
        (None, {"entries": json.dumps([{"key": "nfe6_cfg3", "nfe": 6, "guidance_scale": 1.0}])},
         r"'key' 'nfe6_cfg3' does not match its NFE 6 and guidance scale 1.0 \(expected 'nfe6_cfg1'\)"),
        # refused before, but the message did not name the file
        ({"nfe6_cfg3": torch.tensor([1, 1, float("nan"), 1, 1, 1.0], dtype=torch.float64)}, None,
         r"tensor 'nfe6_cfg3' must be finite"),
        # the version was never checked
        (None, {"version": "99"}, r"fewstep.dc.ratios format version '99' is not supported"),
        (None, {"version": None}, r"format version None is not supported"),
    ],
)
def test_malformed_ratio_tables_are_value_errors_naming_the_file(tmp_path, tensors, header, match):
    path = _rewrite(_table(tmp_path), tmp_path / "bad.safetensors", tensors, header)
    with pytest.raises(ValueError, match=match) as info:
        load_ratio_table(path)
    assert str(path) in str(info.value)
    sched = DC(dc_ratios_file=str(path), dc_model="toy", dc_guidance_scale=3.0)
    with pytest.raises(ValueError, match=match):
        sched.set_timesteps(6)


def test_ratio_table_in_half_precision_loads_and_early_ratios_name_the_file(tmp_path):
    good = _table(tmp_path)
    half = _rewrite(good, tmp_path / "half.safetensors", {"nfe5_cfg3": torch.tensor([1, 1, 1.5, 0.75, 1.25]).half()})
    assert load_ratios(half, "toy", _key(), 5, 3.0) == [1, 1, 1.5, 0.75, 1.25]
    early = _rewrite(good, tmp_path / "early.safetensors", {"nfe6_cfg3": torch.tensor([2.0, 1, 1, 1, 1, 1])})
    with pytest.raises(ValueError, match=r"early.safetensors: entry 'nfe6_cfg3' has ratios \[2.0, 1.0.*with dc_order "
                       r"2 the first 2 must be 1"):
        DC(dc_ratios_file=str(early), dc_model="toy", dc_guidance_scale=3.0).set_timesteps(6)


def _cpr_file(tmp_path):
    cpr = CPRModel(np.eye(36)[0], (5, 10), (1.0, 7.0), 2, [(5, 1.0), (10, 7.0)])
    return save_cpr(tmp_path / "good.cpr.safetensors", cpr, "toy", _key())


@pytest.mark.parametrize(
    "tensors, header, match",
    [
        # found by probing: KeyError, int() and unpack errors, a TypeError at set_timesteps
        ({"coefficients": None, "x": torch.zeros(36, dtype=torch.float64)}, None,
         r"the tensor 'coefficients' is missing \(the file holds \['x'\]\)"),
        (None, {"order": None}, r"metadata field 'order' is missing"),
        (None, {"order": "two"}, r"metadata field 'order' must be an integer in \[1, 3\] \(the DC order\), got 'two'"),
        (None, {"nfe_range": None}, r"metadata field 'nfe_range' is missing"),
        (None, {"nfe_range": "[5]"},
         r"'nfe_range' must be null or \[low, high\] with low <= high \(integers\), got \[5\]"),
        (None, {"nfe_range": '"ab"'}, r"'nfe_range' must be null or \[low, high\]"),
        (None, {"nfe_range": "[10, 5]"}, r"'nfe_range' must be null or \[low, high\] with low <= high"),
        (None, {"guidance_range": "[1, NaN]"}, r"'guidance_range' must be null or \[low, high\]"),
        (None, {"fitted_on": "3"}, r"'fitted_on' must be a JSON list of \[nfe, guidance_scale\] pairs, got 3"),
        (None, {"model": None}, r"metadata field 'model' is missing"),
        (None, {"scheduler": "{"}, r"metadata field 'scheduler' is not valid JSON"),
        ({"coefficients": torch.zeros(36, dtype=torch.complex64)}, None, r"'coefficients' has dtype complex64"),
        # refused before, but the message did not name the file
        ({"coefficients": torch.zeros(35, dtype=torch.float64)}, None, r"'coefficients' must hold 36 numbers"),
        ({"coefficients": torch.full((36,), float("nan"), dtype=torch.float64)}, None,
         r"tensor 'coefficients' must be finite"),
        (None, {"version": "99"}, r"fewstep.dc.cpr format version '99' is not supported"),
    ],
)
def test_malformed_cpr_files_are_value_errors_naming_the_file(tmp_path, tensors, header, match):
    path = _rewrite(_cpr_file(tmp_path), tmp_path / "bad.safetensors", tensors, header)
    with pytest.raises(ValueError, match=match) as info:
        load_cpr(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=match):
        DC(dc_cpr=str(path), dc_model="toy", dc_guidance_scale=3.0)


def test_good_cpr_file_still_loads(tmp_path):
    cpr = load_cpr(_cpr_file(tmp_path), "toy", _key())
    assert cpr.order == 2 and cpr.nfe_range == (5, 10) and cpr.guidance_range == (1.0, 7.0)
    assert cpr.fitted_on == [(5, 1.0), (10, 7.0)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # found by probing: "expected str, bytes or os.PathLike object, not int", "unhashable type: 'list'"
        ({"dc_ratios_file": 5}, r"`dc_ratios_file` must be a ratio table's path \(str or os.PathLike\) or a shipped "
         r"name \(digits-eps\), got 5"),
        ({"dc_ratios_file": ["a"]}, r"`dc_ratios_file` must be .*, got \['a'\]"),
        ({"dc_ratios_file": ""}, r"`dc_ratios_file` must be .*, got ''"),
        # "'int' object is not iterable", "could not convert string to float"
        ({"dc_cpr": 5}, r"`dc_cpr` must be a CPR file's path \(str or os.PathLike\), a shipped name \(digits-eps\) or "
         r"a list of 36 numbers, got int 5"),
        ({"dc_cpr": {"a": 1}}, r"`dc_cpr` must be .*got dict \{'a': 1\}"),
        ({"dc_cpr": ["x"] * 36}, r"`dc_cpr` given as a list must hold 36 real numbers .*got 'x'"),
        ({"dc_cpr": [True] * 36}, r"`dc_cpr` given as a list must hold 36 real numbers .*got True"),
        # reported as "`model` must be ..." (not the argument's name)
        ({"dc_ratios_file": "digits-eps", "dc_model": 5}, r"`dc_model` must be a non-empty string .* got 5"),
        ({"dc_cpr": "digits-eps", "dc_model": ""}, r"`dc_model` must be a non-empty string .* got ''"),
    ],
)
def test_artifact_options_of_the_wrong_type_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DC(**kwargs, dc_guidance_scale=1.0, timestep_spacing="trailing")


def test_artifact_options_accept_paths(tmp_path):
    import pathlib

    path = _cpr_file(tmp_path)
    assert isinstance(path, pathlib.Path)
    by_path = DC(dc_cpr=path, dc_model="toy", dc_guidance_scale=3.0)
    by_path.set_timesteps(6)
    by_str = DC(dc_cpr=str(path), dc_model="toy", dc_guidance_scale=3.0)
    by_str.set_timesteps(6)
    assert by_path.dc_ratios_used == by_str.dc_ratios_used
