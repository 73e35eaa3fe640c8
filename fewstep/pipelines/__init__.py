"""Pipelines: the class-conditional pipeline of the embedded default models, and their loader."""

from .class_conditional import ClassConditionalPipeline
from .defaults import DEFAULT_MODELS, default_model_path, load_default

__all__ = ["ClassConditionalPipeline", "DEFAULT_MODELS", "default_model_path", "load_default"]
