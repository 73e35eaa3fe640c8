"""The math: noise schedules, parameterizations, time grids, phi-functions and the unified engine.

Pure torch + numpy/scipy; nothing here imports diffusers.
"""

from .engine import EngineState, Plan, StepDecision, compile_plan, sample_loop
from .grids import TimeGrid
from .parameterization import from_pair, to_pair
from .schedules import FlowSchedule, NoiseSchedule, VPSchedule, schedule_from_config

__all__ = [
    "EngineState",
    "FlowSchedule",
    "NoiseSchedule",
    "Plan",
    "StepDecision",
    "TimeGrid",
    "VPSchedule",
    "compile_plan",
    "from_pair",
    "sample_loop",
    "schedule_from_config",
    "to_pair",
]
