"""A cached ``DiffusionPipeline._execution_device`` for loops that run many short calls.

diffusers answers ``pipe._execution_device`` by walking every submodule of every component in search of
group-offloading and accelerate hooks, on each call: about 9 ms per call for an SD1.5 UNet and VAE on a slow
host (``scripts/bench_pipeline_cuda.py``'s modules), where a replayed CUDA-graph denoising step takes ~13 ms. The
answer only changes when a component is replaced, moved or given an offloading hook, each of which changes
something cheap to read: the component object, the device of its first parameter (``.to()``, offloading moves the
weights to the CPU or the meta device) or its top-level hook attributes (``_hf_hook`` from
``enable_model_cpu_offload``, ``_diffusers_hook`` registries). ``ExecutionDevice`` keys the answer on those and
asks diffusers again whenever the key changes.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ExecutionDevice", "module_key"]


def module_key(module: torch.nn.Module) -> tuple:
    """What identifies where ``module`` runs, read in O(1): the object, its first parameter's (or buffer's)
    device, and whether it carries accelerate's or diffusers' hooks at the top level."""
    first = next(module.parameters(), None)
    if first is None:
        first = next(module.buffers(), None)
    return (
        id(module), None if first is None else first.device, hasattr(module, "_hf_hook"),
        getattr(module, "_diffusers_hook", None) is not None,
    )  # fmt: skip


class ExecutionDevice:
    """``pipe._execution_device``, recomputed only when a component's ``module_key`` changes."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._device: torch.device | None = None

    @staticmethod
    def _components(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
        # the registered components are plain attributes (read from __dict__: getattr of a config-only key such as
        # requires_safety_checker warns)
        attrs = vars(pipe)
        names = [k for k in getattr(pipe, "config", {}) if not k.startswith("_")]
        return [(k, m) for k in names if isinstance(m := attrs.get(k), torch.nn.Module)]

    def __call__(self, pipe: Any) -> torch.device:
        key = (id(pipe), tuple((name, module_key(m)) for name, m in self._components(pipe)))
        if key != self._key or self._device is None:
            self._device = pipe._execution_device
            self._key = key
        return self._device
