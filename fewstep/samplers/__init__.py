"""diffusers schedulers backed by fewstep's solvers, and the registry the CLI uses.

``get(name)`` returns a scheduler class, ``names()`` lists the registered names; swap one into any
diffusers pipeline with ``pipe.scheduler = get("unipc").from_config(pipe.scheduler.config)``.
"""

from __future__ import annotations

from .base import FewstepScheduler, FewstepSchedulerOutput
from .dc_solver import FewstepDCSolverScheduler
from .ddim import FewstepDDIMScheduler
from .dpm_solver import FewstepDPMSolverScheduler
from .unipc import FewstepUniPCScheduler

__all__ = [
    "FewstepScheduler",
    "FewstepSchedulerOutput",
    "FewstepDDIMScheduler",
    "FewstepDPMSolverScheduler",
    "FewstepUniPCScheduler",
    "FewstepDCSolverScheduler",
    "get",
    "names",
    "describe",
]

_REGISTRY: dict[str, type[FewstepScheduler]] = {
    "ddim": FewstepDDIMScheduler,
    "dpm-solver++": FewstepDPMSolverScheduler,
    "unipc": FewstepUniPCScheduler,
    "dc-solver": FewstepDCSolverScheduler,
}


def names() -> list[str]:
    """Registered sampler names, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> type[FewstepScheduler]:
    """The scheduler class registered under ``name`` (e.g. ``"dpm-solver++"``)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def describe(name: str) -> str:
    """The one-line description of a sampler: the first line of its class docstring."""
    doc = get(name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
