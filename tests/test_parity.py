"""fewstep's engine reproduces diffusers' DDIM, DPM-Solver++ and UniPC over whole sampling loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import REAL_CONFIGS, TinyDenoiser
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from fewstep.samplers import get


def _loop(scheduler, model, steps: int | None, dtype=torch.float64, seed: int = 1, **set_kw) -> torch.Tensor:
    scheduler.set_timesteps(steps, **set_kw)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x.to(torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


CASES = [
    (DDIMScheduler, "ddim", {"timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False}),
    (DDIMScheduler, "ddim", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    (DDIMScheduler, "ddim", {"timestep_spacing": "leading", "set_alpha_to_one": False, "clip_sample": True}),
    (DPMSolverMultistepScheduler, "dpm-solver++", {"solver_order": 1}),
    (DPMSolverMultistepScheduler, "dpm-solver++", {"solver_order": 2}),
    (DPMSolverMultistepScheduler, "dpm-solver++", {"solver_order": 3}),
    (DPMSolverMultistepScheduler, "dpm-solver++", {"solver_order": 2, "solver_type": "heun"}),
    (DPMSolverMultistepScheduler, "dpm-solver++", {"solver_order": 3, "timestep_spacing": "trailing"}),
    (DPMSolverMultistepScheduler, "dpm-solver++", {"solver_order": 2, "prediction_type": "v_prediction",
                                                  "use_karras_sigmas": True}),
    (DPMSolverMultistepScheduler, "dpm-solver++", {"solver_order": 2, "prediction_type": "sample",
                                                  "final_sigmas_type": "sigma_min"}),
    (DPMSolverMultistepScheduler, "dpm-solver++", {"solver_order": 3, "algorithm_type": "dpmsolver",
                                                  "final_sigmas_type": "sigma_min"}),
    (UniPCMultistepScheduler, "unipc", {"solver_order": 1}),
    (UniPCMultistepScheduler, "unipc", {"solver_order": 2}),
    (UniPCMultistepScheduler, "unipc", {"solver_order": 3}),
    (UniPCMultistepScheduler, "unipc", {"solver_order": 2, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    (UniPCMultistepScheduler, "unipc", {"solver_order": 3, "predict_x0": False, "final_sigmas_type": "sigma_min"}),
    (UniPCMultistepScheduler, "unipc", {"solver_order": 2, "disable_corrector": [0, 2],
                                        "prediction_type": "v_prediction"}),
]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("diffusers_cls,name,kwargs", CASES)
def test_full_loop_matches_diffusers(diffusers_cls, name, kwargs, steps):
    model = TinyDenoiser(3 * 8 * 8)
    reference = diffusers_cls(**kwargs)
    ours = get(name).from_config(reference.config)
    expected = _loop(reference, model, steps)
    got = _loop(ours, model, steps)
    assert torch.equal(ours.timesteps, reference.timesteps)
    assert _rel(got, expected) < 1e-5


@pytest.mark.parametrize("config_name", ["sd15", "sd21", "sdxl"])
@pytest.mark.parametrize("name,diffusers_cls", [("dpm-solver++", DPMSolverMultistepScheduler),
                                                 ("unipc", UniPCMultistepScheduler)])
def test_swap_from_real_pipeline_configs_matches_diffusers_swap(config_name, name, diffusers_cls):
    """`X.from_config(pipe.scheduler.config)` gives the same sampler as diffusers' own swap."""
    config = REAL_CONFIGS[config_name]
    model = TinyDenoiser(3 * 8 * 8)
    reference = diffusers_cls.from_config(config)
    ours = get(name).from_config(config)
    assert ours.config.prediction_type == config.get("prediction_type", "epsilon")
    assert _rel(_loop(ours, model, 8), _loop(reference, model, 8)) < 1e-5


def test_unipc_bh1_to_clean_sample_is_finite_where_diffusers_is_not():
    """diffusers' UniPC bh1 multiplies B(h) = -inf by 0 at the last step to sigma = 0 and returns NaN."""
    model = TinyDenoiser(3 * 8 * 8)
    reference = UniPCMultistepScheduler(solver_type="bh1")
    ours = get("unipc").from_config(reference.config)
    assert torch.isnan(_loop(reference, model, 6)).any()
    assert torch.isfinite(_loop(ours, model, 6)).all()


@pytest.mark.parametrize("name", ["dpm-solver++", "unipc", "ddim"])
def test_float16_and_float64_agree(name):
    """UniPC and the others run in float16 (computed in float32 internally) and float64."""
    model = TinyDenoiser(3 * 8 * 8)
    sched = get(name)()
    x64 = _loop(sched, model, 10, dtype=torch.float64)
    x16 = _loop(sched, model, 10, dtype=torch.float16)
    assert torch.isfinite(x16).all()
    assert _rel(x16, x64) < 5e-3


def test_pred_original_sample_is_returned():
    model = TinyDenoiser(3 * 8 * 8)
    sched = get("ddim")(clip_sample=False)
    sched.set_timesteps(4)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    out = sched.step(model(x, sched.timesteps[0]), sched.timesteps[0], x)
    alpha = sched.plan.grid.alphas[0]
    sigma = sched.plan.grid.sigmas[0]
    torch.testing.assert_close(out.pred_original_sample, (x - sigma * model(x, sched.timesteps[0])) / alpha)


@pytest.mark.parametrize("config_name,mu", [("sd3", None), ("flux", 0.8)])
def test_ddim_on_flow_configs_is_flow_match_euler(config_name, mu):
    """On SD3/Flux configs fewstep's DDIM is exactly diffusers' FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = REAL_CONFIGS[config_name]
    reference = FlowMatchEulerDiscreteScheduler.from_config(config)
    ours = get("ddim").from_config(config)
    assert ours.is_flow and ours.config.prediction_type == "flow_prediction" and not ours.config.clip_sample
    kw = {"mu": mu} if mu is not None else {}
    model = TinyDenoiser(3 * 8 * 8)
    got, expected = _loop(ours, model, 10, **kw), _loop(reference, model, 10, **kw)
    assert _rel(got, expected) < 1e-5


@pytest.mark.parametrize("name,diffusers_cls", [("dpm-solver++", DPMSolverMultistepScheduler),
                                                 ("unipc", UniPCMultistepScheduler)])
def test_multistep_flow_sigmas_follow_diffusers(name, diffusers_cls):
    """`use_flow_sigmas` configs give diffusers' flow grid. diffusers stores sigma = 1 - 1e-6 in float32
    (alpha = 1e-6 off by ~1%), so the loops agree to ~1e-3 rather than float64 precision."""
    reference = diffusers_cls(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    ours = get(name).from_config(reference.config)
    model = TinyDenoiser(3 * 8 * 8)
    expected = _loop(reference, model, 10)
    got = _loop(ours, model, 10)
    torch.testing.assert_close(ours.sigmas, reference.sigmas, rtol=1e-6, atol=1e-6)
    assert _rel(got, expected) < 1e-2


def test_user_flow_sigmas_are_shifted_as_diffusers_does():
    """Flux-style ``set_timesteps(sigmas=...)`` on a shifted flow config: the sigmas are shifted first."""
    import numpy as np
    from diffusers import UniPCMultistepScheduler

    ref = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    ours = get("unipc").from_config(ref.config)
    model = TinyDenoiser(32)
    outs = []
    for sched in (ref, ours):
        sched.set_timesteps(sigmas=np.linspace(1, 1 / 8, 8))
        x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
        outs.append(x)
    # diffusers feeds the model int64 timesteps (999, 954, ...) where fewstep keeps 999.999, 954.5: ~1e-5
    assert ((outs[0] - outs[1]).abs().max() / outs[0].abs().max()).item() < 2e-4


@pytest.mark.parametrize("config_name,mu", [("sd3", None), ("flux", 0.8)])
def test_ddim_on_flow_configs_shifts_user_timesteps_as_flow_match_euler(config_name, mu):
    """User ``timesteps`` on a flow config are sigmas * T, shifted like any others (before, DDIM took them
    unshifted: 5% off diffusers' FlowMatchEuler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = REAL_CONFIGS[config_name]
    model = TinyDenoiser(3 * 8 * 8)
    kw = {"timesteps": [1000.0, 800.0, 500.0, 200.0, 50.0], **({"mu": mu} if mu is not None else {})}
    reference, ours = FlowMatchEulerDiscreteScheduler.from_config(config), get("ddim").from_config(config)
    got, expected = _loop(ours, model, None, **kw), _loop(reference, model, None, **kw)
    torch.testing.assert_close(ours.sigmas.double(), reference.sigmas.double(), rtol=0, atol=2e-6)  # s <= 1 - 1e-6
    assert _rel(got, expected) < 1e-5


@pytest.mark.parametrize("bounds", [{"sigma_min": 0.1, "sigma_max": 10.0}, {"sigma_min": 0.1}, {}])
@pytest.mark.parametrize("name,diffusers_cls", [("dpm-solver++", DPMSolverMultistepScheduler),
                                                 ("unipc", UniPCMultistepScheduler)])
def test_karras_grid_takes_the_configs_sigma_bounds(name, diffusers_cls, bounds):
    """diffusers' Karras grids read ``sigma_min``/``sigma_max`` from the config when it has them (Euler's keys);
    fewstep ignored them (44% off)."""
    config = {**diffusers_cls(use_karras_sigmas=True).config, **bounds}
    reference, ours = diffusers_cls.from_config(config), get(name).from_config(config)
    model = TinyDenoiser(3 * 8 * 8)
    expected, got = _loop(reference, model, 6), _loop(ours, model, 6)
    assert torch.equal(ours.timesteps, reference.timesteps)
    assert _rel(got, expected) < 1e-6


# a DDPM pipeline's scheduler config as older pipelines ship it: clip_sample on, no clip_sample_range
LEGACY_DDPM = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
               "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small"}


@pytest.mark.parametrize("config", [pytest.param(None, id="DDPMScheduler()"), pytest.param(LEGACY_DDPM, id="legacy")])
@pytest.mark.parametrize("name,diffusers_cls", [("dpm-solver++", DPMSolverMultistepScheduler),
                                                 ("unipc", UniPCMultistepScheduler)])
def test_ddpm_config_swap_ignores_clip_sample_as_diffusers_does(name, diffusers_cls, config):
    """Found by a parity probe: diffusers' ``from_config`` copies a DDPM config's ``clip_sample=True`` onto the
    UniPC/DPM-Solver config; fewstep then clamped x0 (95% off diffusers' own swap, which ignores the key), and a
    config without ``clip_sample_range`` crashed at the first step (AttributeError on the FrozenDict)."""
    from diffusers import DDPMScheduler

    if config is None:  # as save_pretrained writes it: every key explicit
        config = {k: v for k, v in DDPMScheduler().config.items() if k != "_use_default_values"}
    model = TinyDenoiser(3 * 8 * 8)
    reference, ours = diffusers_cls.from_config(config), get(name).from_config(config)
    assert ours.config.get("clip_sample") is True and ours.clip_range() is None  # copied over, not honoured
    assert _rel(_loop(ours, model, 10), _loop(reference, model, 10)) < 1e-5
    # DDIM declares clip_sample and still clips, as diffusers' DDIMScheduler does
    ddim = get("ddim").from_config(config)
    assert ddim.clip_range() == 1.0
    assert _rel(_loop(ddim, model, 10), _loop(DDIMScheduler.from_config(config), model, 10)) < 1e-5


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("name,diffusers_cls", [("dpm-solver++", DPMSolverMultistepScheduler),
                                                 ("unipc", UniPCMultistepScheduler)])
def test_zero_snr_karras_grid_starts_at_diffusers_sigma_max(name, diffusers_cls, beta_schedule):
    """diffusers' Karras range starts at its zero-SNR stand-in alpha_bar = 2^-24 (sigma 4096). fewstep started at
    its own last level, which on linear betas is half of alpha_bar[-2] (sigma 21787): timesteps 999, 995, 965, 693
    vs diffusers' 995, 981, 893, 513 at 5 steps, samples 55% apart."""
    reference = diffusers_cls(beta_schedule=beta_schedule, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                              prediction_type="v_prediction", use_karras_sigmas=True)  # fmt: skip
    ours = get(name).from_config(reference.config)
    model = TinyDenoiser(3 * 8 * 8)
    expected, got = _loop(reference, model, 5), _loop(ours, model, 5)
    # under numpy 1.x diffusers' own first timestep moves (999: its _sigma_to_t subtracts a float64 scalar from a
    # float32 array, which numpy 1 computes in float32); fewstep's does not
    first = 0 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 1
    assert torch.equal(ours.timesteps[first:], reference.timesteps[first:])
    torch.testing.assert_close(ours.sigmas, reference.sigmas, rtol=1e-6, atol=0)
    assert _rel(got, expected) < 1e-5


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("algorithm", ["sde-dpmsolver++", "sde-dpmsolver", "dpmsolver++"])
def test_dpm_solver_variance_noise_matches_diffusers(algorithm, order):
    """``step(..., variance_noise=)`` takes the SDE step's noise as diffusers' DPMSolverMultistepScheduler does
    (positionally too: its fifth argument), and draws nothing from the global RNG; the ODE types ignore it."""
    kwargs = {"algorithm_type": algorithm, "solver_order": order, "final_sigmas_type": "sigma_min"}
    model = TinyDenoiser(3 * 8 * 8)
    reference = DPMSolverMultistepScheduler(**kwargs)
    ours = get("dpm-solver++").from_config(reference.config)
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(6)]
    out = []
    for sched in (reference, ours):
        sched.set_timesteps(6)
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        torch.manual_seed(0)
        for t, noise in zip(sched.timesteps, noises):
            x = sched.step(model(x, t), t, x, None, noise).prev_sample
        out.append((x, torch.rand(1)))
    assert _rel(out[1][0], out[0][0]) < 1e-5
    assert torch.equal(out[1][1], out[0][1])  # same global RNG state after both loops: nothing drawn
    if algorithm.startswith("sde-"):
        ours.set_timesteps(6)
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        t = ours.timesteps[0]
        other = ours.step(model(x, t), t, x, variance_noise=-noises[0]).prev_sample
        ours.set_timesteps(6)
        same = ours.step(model(x, t), t, x, variance_noise=noises[0]).prev_sample
        assert (other - same).abs().max() > 1e-3  # the noise is used, not ignored


def test_dpm_solver_variance_noise_is_checked():
    sched = get("dpm-solver++")(algorithm_type="sde-dpmsolver++")
    sched.set_timesteps(4)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"`variance_noise` must have the sample's shape"):
        sched.step(x, sched.timesteps[0], x, variance_noise=torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match=r"`variance_noise` must be a floating tensor"):
        sched.step(x, sched.timesteps[0], x, variance_noise=torch.zeros(1, 3, 4, 4, dtype=torch.int64))
    assert sched.step_index is None  # a refused call does not advance


@pytest.mark.parametrize("name", ["flow-euler", "ddim"])
@pytest.mark.parametrize("given", [{"sigmas": [1.0, 0.6, 0.3, 0.0]}, {"timesteps": [1000.0, 500.0, 0.0]},
                                   {"sigmas": [1.0, 0.6, 0.3, 0.0], "mu": 0.8}])
def test_custom_flow_list_ending_in_zero_is_stretched_to_shift_terminal_as_diffusers(name, given):
    """Found by a probe: with `shift_terminal`, diffusers stretches a custom list's trailing 0 with the rest (onto
    shift_terminal, then steps on to 0); fewstep dropped it first and stretched the last nonzero point instead (one
    model call fewer, 0.2-0.7% off)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {"shift_terminal": 0.1, **({"use_dynamic_shifting": True} if "mu" in given else {"shift": 3.0})}
    reference = FlowMatchEulerDiscreteScheduler(**config)
    ours = get(name).from_config(reference.config)
    model = TinyDenoiser(3 * 8 * 8)
    expected, got = (_loop(s, model, None, **given) for s in (reference, ours))
    assert len(ours.timesteps) == len(reference.timesteps)
    torch.testing.assert_close(ours.timesteps[1:], reference.timesteps[1:].to(ours.timesteps.dtype))
    assert _rel(got, expected) < 1e-5
