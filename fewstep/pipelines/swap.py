"""Swap a fewstep sampler into a pipeline, checking that the sampler fits the pipeline's process."""

from __future__ import annotations

from typing import Any

from .. import samplers

__all__ = ["swap_sampler"]


def swap_sampler(pipe: Any, name: str, **options: Any) -> Any:
    """``pipe.scheduler = samplers.from_config(name, pipe.scheduler.config, **options)``, made safe.

    Mean-reverting samplers (``mrs``) only fit mean-reverting pipelines and get the pipeline's
    ``stationary_std`` unless given; ordinary samplers run a mean-reverting pipeline in its VP variable ``z``.
    """
    from .mean_reverting import MeanRevertingPipeline

    if samplers.process_of(name) == "mean-reverting":
        if not isinstance(pipe, MeanRevertingPipeline):
            raise ValueError(
                f"sampler {name!r} is for mean-reverting (restoration) models, not {type(pipe).__name__}; "
                f"compatible samplers: {', '.join(_compatible(pipe))}"
            )
        options.setdefault("stationary_std", float(pipe.config.stationary_std))
    pipe.scheduler = samplers.from_config(name, pipe.scheduler.config, **options)
    return pipe


def _compatible(pipe: Any) -> list[str]:
    """Samplers for a non-mean-reverting pipeline: every diffusion sampler, plus flow-only ones on flow configs."""
    from ..solvers.schedules import is_flow_config

    flow = is_flow_config(dict(getattr(getattr(pipe, "scheduler", None), "config", None) or {}))
    return samplers.names("diffusion") + (samplers.names("flow") if flow else [])
