"""Pipelines: the class-conditional pipeline of the embedded default models, and their loader."""

from .class_conditional import ClassConditionalPipeline
from .defaults import DEFAULT_MODELS, default_model_path, load_default
from .mean_reverting import MeanRevertingPipeline, box_inpainting

__all__ = [
    "ClassConditionalPipeline",
    "DEFAULT_MODELS",
    "MeanRevertingPipeline",
    "box_inpainting",
    "default_model_path",
    "load_default",
]
