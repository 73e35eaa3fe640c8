"""Host-side work moved out of the sampling loop (found by a host-overhead audit): DPM-Solver-v3 coefficients reach
the device in ``set_timesteps`` (they were copied from the host inside ``step``: a host sync each on CUDA), compiled
EMS transitions are reused across ``set_timesteps`` calls, and the NaN/Inf watch is one reduction a step."""

from __future__ import annotations

import torch

import fewstep
from fewstep.pipelines.loop_checks import FiniteWatch
from fewstep.solvers.ems import EMSTransition


def _ems_transitions(plan) -> list:
    return [tr for step in plan.steps for tr in (step.corrector, step.predictor) if isinstance(tr, EMSTransition)]


def _run(sched, x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        x = sched.step(torch.randn(x.shape, generator=g), t, x).prev_sample
    return x


def test_dpm_solver_v3_step_makes_no_host_to_device_copies(monkeypatch):
    sched = fewstep.load_default("digits-eps", sampler="dpm-solver-v3").scheduler
    sched.set_timesteps(8, device="cpu")
    transitions = _ems_transitions(sched.plan)
    assert transitions and all((torch.device("cpu"), torch.float32) in tr._cache for tr in transitions)
    made = []
    real = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    _run(sched, torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert made == []  # every coefficient was already a device tensor


def test_set_timesteps_reuses_compiled_ems_transitions():
    """The per-element integrals of an EMS transition took ~5 ms a step on 16x16 digits at every set_timesteps (a
    new generation); a second call with the same grid reuses them and samples bit for bit the same."""
    sched = fewstep.load_default("digits-eps", sampler="dpm-solver-v3").scheduler
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sched.set_timesteps(6)
    first, out1 = _ems_transitions(sched.plan), _run(sched, x)
    sched.set_timesteps(9)  # another grid in between
    sched.set_timesteps(6)
    again, out2 = _ems_transitions(sched.plan), _run(sched, x)
    assert len(first) == len(again) and all(a is b for a, b in zip(first, again))
    assert torch.equal(out1, out2)
    other = fewstep.load_default("digits-eps", sampler="dpm-solver-v3").scheduler  # its own tables: no sharing
    other.set_timesteps(6)
    assert not any(a is b for a, b in zip(first, _ems_transitions(other.plan)))


def test_finite_watch_names_the_first_bad_step_and_not_huge_finite_values():
    """One float64 sum a step: NaN/Inf propagate through it, and finite float32 latents cannot overflow it."""
    watch = FiniteWatch(torch.device("cpu"), 4)
    big = torch.full((3, 4), 3e38)  # their float32 sum would overflow
    watch.update(big, 0)
    watch.update(torch.ones(2, dtype=torch.float16), 1)
    watch.raise_if_bad(4, "s")  # nothing bad yet
    inf = torch.ones(2, 2)
    inf[1, 1] = float("inf")
    watch.update(inf, 2)
    nan = torch.zeros(2, 2)
    nan[0, 0] = float("nan")
    watch.update(nan, 3)
    try:
        watch.raise_if_bad(4, "s")
    except FloatingPointError as exc:
        assert "NaN/Inf at step 2 of 4 (sampler s)" in str(exc)
    else:
        raise AssertionError("a NaN/Inf step was not reported")


def test_s3_reads_a_shipped_schedule_once_per_nfe(monkeypatch):
    """A shipped schedule was read from its JSON and checked against the EMS at every set_timesteps."""
    from fewstep.solvers.s3 import SolverSchedule

    sched = fewstep.load_default("digits-eps", sampler="s3").scheduler
    reads = []
    real = SolverSchedule.load
    monkeypatch.setattr(SolverSchedule, "load", staticmethod(lambda path: reads.append(path) or real(path)))
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    sched.set_timesteps(5)
    first = _run(sched, x)
    sched.set_timesteps(6)
    sched.set_timesteps(5)
    assert len(reads) == 2 and torch.equal(_run(sched, x), first)


def test_the_compiled_transition_cache_is_bounded_by_memory(monkeypatch):
    """The cache was bounded by entry count only: SD-sized tables kept 1.6 GB of float64 arrays after
    set_timesteps(5..50) in one process (review of this change). It now empties past a byte budget."""
    from fewstep.solvers import engine

    sched = fewstep.load_default("digits-eps", sampler="dpm-solver-v3").scheduler
    sched.set_timesteps(4)
    one = max(engine._transition_bytes(tr) for tr in _ems_transitions(sched.plan))
    monkeypatch.setattr(engine, "_TRANSITION_CACHE_BYTES", 6 * one)
    for n in range(4, 16):
        sched.set_timesteps(n)
        cache = engine._transition_cache(sched.ems)
        assert cache.bytes <= 6 * one and cache.bytes == sum(engine._transition_bytes(t) for t in cache.values())
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    fresh = fewstep.load_default("digits-eps", sampler="dpm-solver-v3").scheduler
    fresh.set_timesteps(15)
    assert torch.equal(_run(sched, x), _run(fresh, x))  # entries dropped and rebuilt: the same numbers
