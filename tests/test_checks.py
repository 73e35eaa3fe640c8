"""Tests for the shared argument checks in :mod:`fewstep._checks`."""

import math

import numpy as np
import pytest

from fewstep._checks import check_int, check_number


def test_check_int_accepts_and_returns_int():
    assert check_int("n", 3) == 3
    assert check_int("n", 1) == 1
    out = check_int("n", np.int64(4))
    assert out == 4 and type(out) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_check_int_rejects_bools(value):
    with pytest.raises(ValueError, match=r"`n` must be an integer >= 0, got"):
        check_int("n", value, 0)


def test_check_int_numpy_flag():
    assert check_int("n", np.int32(2), numpy_ok=True) == 2
    # where a Python int is stored, the message says so instead of "must be an integer ..., got np.int32(2)"
    with pytest.raises(ValueError, match=r"`n` must be a Python int >= 1, got the numpy integer (np\.int32\()?2.*"
                                         r"pass int\(\.\.\.\)"):
        check_int("n", np.int32(2), numpy_ok=False)


@pytest.mark.parametrize("value", [1.0, "1", None, 2.5])
def test_check_int_rejects_non_integers(value):
    with pytest.raises(ValueError, match=r"`n` must be an integer >= 1, got"):
        check_int("n", value)


def test_check_int_bounds_inclusive_and_messages():
    assert check_int("k", 2, 2, 5) == 2
    assert check_int("k", 5, 2, 5) == 5
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[2, 5\], got 6"):
        check_int("k", 6, 2, 5)
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[2, 5\], got 1"):
        check_int("k", 1, 2, 5)
    with pytest.raises(ValueError, match=r"`m` must be an integer >= 1, got 0"):
        check_int("m", 0)
    with pytest.raises(ValueError, match=r"`m` must be an integer >= 2, got -3"):
        check_int("m", -3, 2)
    assert check_int("z", -7, None) == -7
    with pytest.raises(ValueError, match=r"`z` must be an integer, got 'a'"):
        check_int("z", "a", None)
    with pytest.raises(ValueError, match=r"`h` must be an integer <= 3, got 4"):
        check_int("h", 4, None, 3)


def test_check_number_accepts():
    assert check_number("eta", 0) == 0.0
    assert check_number("eta", 0.5, 0) == 0.5
    assert check_number("eta", np.float32(1.5), 0, 2) == 1.5
    assert check_number("eta", 2, 0, 2) == 2.0
    assert check_number("x", math.inf, finite=False) == math.inf


@pytest.mark.parametrize("value", [True, "1", None, math.nan, math.inf, -math.inf, np.nan])
def test_check_number_rejects_bools_nan_inf(value):
    with pytest.raises(ValueError, match=r"`eta` must be a finite number >= 0, got"):
        check_number("eta", value, 0)


def test_check_number_bounds_and_messages():
    with pytest.raises(ValueError, match=r"`eta` must be a finite number >= 0, got -0\.1"):
        check_number("eta", -0.1, 0)
    with pytest.raises(ValueError, match=r"`lam` must be a finite number > 0, got 0"):
        check_number("lam", 0, 0, low_open=True)
    assert check_number("lam", 1e-9, 0, low_open=True) == 1e-9
    with pytest.raises(ValueError, match=r"`b` must be a finite number in \(0, 1\], got 1\.5"):
        check_number("b", 1.5, 0, 1, low_open=True)
    with pytest.raises(ValueError, match=r"`b` must be a finite number in \[0, 1\], got 2"):
        check_number("b", 2, 0, 1)
    with pytest.raises(ValueError, match=r"`x` must be a number, got nan"):
        check_number("x", math.nan, finite=False)
    with pytest.raises(ValueError, match=r"`x` must be a finite number, got inf"):
        check_number("x", math.inf)


def test_what_and_allowed_extend_the_message():
    with pytest.raises(ValueError, match=r"^`inner_steps` \(M\) must be an integer >= 1, got 0$"):
        check_int("inner_steps", 0, 1, what="M")
    with pytest.raises(ValueError, match=r"^`step_size` \(eta\) must be a finite number >= 0, got -1$"):
        check_number("step_size", -1, 0, what="eta")
    with pytest.raises(ValueError, match=r"^`momentum` must be a finite number in \(-1, 1\), got 2$"):
        check_number("momentum", 2, -1.0, 1.0, allowed="(-1, 1)")
    with pytest.raises(ValueError, match=r"^`r` must be a finite number in \[0\.5, 2\], got 3$"):
        check_number("r", 3, 0.5, 2.0)  # float bounds print compactly


def test_differing_keys_counts_a_key_one_side_lacks():
    from fewstep._checks import MISSING, differing_keys

    assert differing_keys({"a": 1, "b": None, "c": 3}, {"a": 1, "c": 4, "d": 0}) == ["b", "c", "d"]
    assert differing_keys({}, {}) == [] and {"b": None}.get("x", MISSING) is MISSING
