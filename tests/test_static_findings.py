"""Found by a static-analysis probe (mypy/pyright/vulture): keywords a scheduler's ``step`` does not know are refused,
huge ints are a ValueError in the shared number check, an empty sampler list is not "every sampler"."""

import pytest
import torch
from diffusers import DDPMScheduler

from fewstep import samplers
from fewstep._checks import check_number
from fewstep.bench.analytic_bench import run_analytic_bench


def test_mrs_step_refuses_unknown_keywords():
    sched = samplers.get("mrs")(stationary_std=0.5)
    sched.set_timesteps(4)
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(TypeError, match="genrator"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x, mu=x, genrator=torch.Generator())


@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_check_number_huge_int_is_a_value_error(value):
    with pytest.raises(ValueError, match=r"`x` must be a finite number >= 0, got -?1000"):
        check_number("x", value, 0.0)
    with pytest.raises(ValueError, match="`fractional order` must be a finite number"):
        samplers.from_config("hb", DDPMScheduler().config, momentum_order=value)


def test_check_number_huge_int_without_finite_is_infinite():
    assert check_number("x", 10**400, 0.0, finite=False) == float("inf")


def test_analytic_bench_refuses_an_empty_sampler_list():
    with pytest.raises(ValueError, match="`samplers` must not be empty"):
        run_analytic_bench(samplers=[], steps=[5])
