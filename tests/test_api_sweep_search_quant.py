"""Argument checks of the S^3 search and the quantization API that a bad-input sweep found missing: counts, seeds and
flags of ``search``, ``SearchSpace``'s fields, ``quantizable_layers(exclude=str)``, ``quantize``/``load_quantized``/
``save_quantized`` flags and ids, ``Histogram`` / ``ndtc_indices`` / ``search_act_range`` numbers, ``set_mode``."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from test_quant_probe_fixes import _Tiny

from fewstep import quant
from fewstep.quant.calibration import ndtc_indices
from fewstep.quant.quantizers import Histogram, search_act_range
from fewstep.search import SearchSpace, search
from fewstep.solvers import VPSchedule
from fewstep.solvers.schedules import FlowSchedule

SCHEDULE = VPSchedule(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))


def _metric(schedule) -> float:
    return 0.5


# ------------------------------------------------------------------------------------------------ search
@pytest.mark.parametrize("name", ["per_round", "candidates_per_round", "num_parents"])
@pytest.mark.parametrize("value", [0, -1, None, True, 2.5, "4"])
def test_search_refuses_bad_counts(name, value):
    """Found by probing: per_round=0 looped forever, 0/-1/None/True were accepted, floats failed deep inside ("slice
    indices must be integers", numpy's "high <= 0"). budget=1 ends before the first round, so without the check the
    call returns instead of hanging."""
    with pytest.raises(ValueError, match=rf"`{name}` must be an integer >= 1, got {re.escape(repr(value))}"):
        search(_metric, SearchSpace(SCHEDULE, 4), budget=1, progress=False, **{name: value})


@pytest.mark.parametrize("value", [-1, None, 1.5, "1", True])
def test_search_refuses_a_bad_seed(value):
    """Found by probing: seed=-1 failed with numpy's "expected non-negative integer", None was accepted."""
    with pytest.raises(ValueError, match=rf"`seed` must be an integer >= 0, got {re.escape(repr(value))}"):
        search(_metric, SearchSpace(SCHEDULE, 4), budget=1, seed=value, progress=False)


@pytest.mark.parametrize("name", ["use_predictor", "progress"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_search_flags_must_be_bools(name, value):
    kwargs = {"progress": False, name: value}
    with pytest.raises(ValueError, match=rf"`{name}` must be True or False, got {re.escape(repr(value))}"):
        search(_metric, SearchSpace(SCHEDULE, 4), budget=1, **kwargs)


def test_search_checks_metric_and_space():
    with pytest.raises(ValueError, match=r"`metric` must be a callable schedule -> float .*, got None"):
        search(None, SearchSpace(SCHEDULE, 4), budget=1, progress=False)
    with pytest.raises(ValueError, match=r"`space` must be a SearchSpace, got str"):
        search(_metric, "space", budget=1, progress=False)


@pytest.mark.parametrize("value", [math.inf, 1e30, 4.7, True, torch.tensor(1.0), "1.0"])
def test_search_space_refuses_lambda_end_outside_the_schedule(value):
    """Found by probing: lambda_end=inf (or beyond lambda at t_min) was accepted and the search failed later naming
    `timesteps` (all later time points collapse onto t_min)."""
    with pytest.raises(ValueError, match=r"`lambda_end` \(the last allowed evaluation point in lambda; None: lambda at "
                                         r"t_min\) must be a finite number in \(-5\.05884, 4\.60512\], got "):
        SearchSpace(SCHEDULE, 4, lambda_end=value)
    # the range's upper end (lambda at t_min, the default) and numpy numbers inside it are accepted
    default = SearchSpace(SCHEDULE, 4)
    assert SearchSpace(SCHEDULE, 4, lambda_end=default.lambda_end).lambda_end == default.lambda_end
    assert SearchSpace(SCHEDULE, 4, lambda_end=np.float64(2.0)).lambda_end == 2.0


@pytest.mark.parametrize("value", [2.5, True, None, "3", 0, 5])
def test_search_space_max_order_must_be_an_integer_in_range(value):
    """Found by probing: max_order=2.5 / True were accepted, None / '3' failed with a comparison TypeError."""
    with pytest.raises(ValueError, match=rf"`max_order` must be an integer in \[1, 4\], got {re.escape(repr(value))}"):
        SearchSpace(SCHEDULE, 4, max_order=value)


def test_search_space_checks_its_schedule():
    with pytest.raises(ValueError, match=r"`schedule` must be a fewstep.solvers.schedules.NoiseSchedule .*, got "
                                         r"NoneType"):
        SearchSpace(None, 4)
    # a flow schedule's lambda is infinite at both ends: the search failed later with "`lambda` must not be NaN"
    with pytest.raises(ValueError, match=r"`schedule` \(FlowSchedule\) has lambda -inf at t_max and inf at t_min; .* "
                                         r"needs a finite range"):
        SearchSpace(FlowSchedule(), 4)


# ------------------------------------------------------------------------------------------------ quant


def _calibration() -> quant.CalibrationSet:
    g = torch.Generator().manual_seed(0)
    return quant.CalibrationSet(torch.randn(4, 2, 6, 6, generator=g), torch.zeros(4, dtype=torch.long))


CONFIG = quant.QuantConfig(act_grid=5, weight_grid=5)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = _Tiny().eval()
    return model, quant.quantize(model, _calibration(), CONFIG)


@pytest.mark.parametrize("exclude", ["conv_in", ["conv_in", 3], None])
def test_quantizable_layers_refuses_a_string_exclude(exclude):
    """Found by probing: exclude='conv_in' was read letter by letter and excluded nothing; QuantConfig refused it."""
    with pytest.raises(ValueError, match=r"`exclude` must be a list of fnmatch patterns \(strings; \[\] quantizes "
                                         rf"every layer\), got {re.escape(repr(exclude))}"):
        quant.quantizable_layers(_Tiny(), exclude=exclude)
    assert list(quant.quantizable_layers(_Tiny(), exclude=("conv_in",))) == ["a", "b"]


@pytest.mark.parametrize("name", ["inplace", "progress"])
def test_quantize_flags_must_be_bools(name):
    """Found by probing: inplace='no' quantized the model in place (any truthy value did)."""
    model = _Tiny().eval()
    with pytest.raises(ValueError, match=rf"`{name}` must be True or False, got 'no'"):
        quant.quantize(model, _calibration(), CONFIG, **{name: "no"})
    assert not quant.quant_layers(model) and getattr(model, "fewstep_quant", None) is None


def test_load_quantized_checks_strict_and_model_id(tiny, tmp_path):
    model, q = tiny
    quant.save_quantized(q, tmp_path / "q")
    with pytest.raises(ValueError, match=r"`strict` must be True or False, got 'yes'"):
        quant.load_quantized(model, tmp_path / "q", strict="yes")
    with pytest.raises(ValueError, match=r"`model_id` must be a string \(the model's name.*\) or None, got 1"):
        quant.load_quantized(model, tmp_path / "q", model_id=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"model_id": 1}, r"`model_id` must be a string \(the model's name, e.g. 'digits-eps'\) or None, got 1"),
    ({"extra": "x"}, r"`extra` must be a dict with string keys \(stored as quant.json's 'extra'\) or None, got 'x'"),
    ({"extra": {1: "a"}}, r"`extra` must be a dict with string keys .* got \{1: 'a'\}"),
    ({"extra": {"error": torch.tensor(1.0)}}, r"`extra` must hold JSON values only \(it is stored in quant.json\): "
                                              r".*Tensor is not JSON serializable"),
])
def test_save_quantized_checks_model_id_and_extra(tiny, tmp_path, kwargs, message):
    """Found by probing: model_id=1 and extra='x' were written into quant.json; a non-JSON extra raised json's
    TypeError."""
    with pytest.raises(ValueError, match=message):
        quant.save_quantized(tiny[1], tmp_path / "q", **kwargs)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("lo, hi, name", [("1.0", 2.0, "lo"), (0.0, True, "hi"), (math.nan, 1.0, "lo"),
                                          (0.0, math.inf, "hi")])
def test_histogram_range_must_be_finite_numbers(lo, hi, name):
    """Found by probing: Histogram('1.0', True) was accepted (float() of anything)."""
    value = hi if name == "hi" else lo
    with pytest.raises(ValueError, match=rf"`{name}` must be a finite number, got {re.escape(repr(value))}"):
        Histogram(lo, hi)


def test_ndtc_and_range_search_refuse_bools_as_numbers():
    with pytest.raises(ValueError, match=r"`std` \(fraction of the steps\) must be a finite number > 0, got True"):
        ndtc_indices(4, 10, std=True)
    with pytest.raises(ValueError, match=r"`mean` \(fraction of the steps\) must be in \[0, 0.5\] .*, got False"):
        ndtc_indices(4, 10, mean=False)
    with pytest.raises(ValueError, match=r"`p` must be a finite number > 0, got True"):
        search_act_range(Histogram.of(torch.randn(64)), p=True)


@pytest.mark.parametrize("mode", [None, ["fake"], 1])
def test_set_mode_names_the_argument_and_the_modes(tiny, mode):
    """Found by probing: set_mode(q, None) failed with "'NoneType' object is not iterable"."""
    with pytest.raises(ValueError, match=r"`mode` must be one of \['fake', 'int8', 'fp8', 'dequant', 'auto'\] or a "
                                         rf"dict layer name -> mode, got {re.escape(repr(mode))}"):
        quant.set_mode(tiny[1], mode)
