"""Module-state bookkeeping without changing the caller's modules: the samplers that differentiate through a model
(posterior sampling, DPS) need autograd on (so not ``torch.inference_mode``) and no parameter gradients; estimators
that run a model need it in eval mode."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["frozen_parameters", "eval_mode", "check_autograd_available"]


class _SharedOverride:
    """One attribute of many objects overridden for as long as any holder needs it: the first holder of an object
    saves its own value, every holder sets the override on entry, the last one to leave restores the saved value.
    Snapshots taken per block are only right when blocks nest; two runs in two threads over one model do not (run B
    would save run A's override as "the caller's" and restore it for good, or run A would restore the caller's value
    under run B). Holds a reference to each held object, so its ``id`` cannot be reused while held."""

    def __init__(self, read: Callable[[Any], Any], write: Callable[[Any, Any], None]):
        self._read, self._write = read, write
        self._lock = threading.Lock()
        self._held: dict[int, list] = {}  # id(obj) -> [obj, its own value, number of holders]

    @contextmanager
    def __call__(self, objects: list[Any], value: Any) -> Iterator[None]:
        objects = list({id(o): o for o in objects}.values())
        with self._lock:
            for obj in objects:
                entry = self._held.get(id(obj))
                if entry is None:
                    self._held[id(obj)] = [obj, self._read(obj), 1]
                else:
                    entry[2] += 1
                self._write(obj, value)  # also inside a block whose body changed it back
        try:
            yield
        finally:
            with self._lock:
                for obj in objects:
                    entry = self._held[id(obj)]
                    entry[2] -= 1
                    if entry[2] == 0:
                        del self._held[id(obj)]
                        self._write(obj, entry[1])


_requires_grad = _SharedOverride(lambda p: p.requires_grad, lambda p, flag: p.requires_grad_(flag))
_training = _SharedOverride(lambda m: m.training, lambda m, flag: setattr(m, "training", flag))


@contextmanager
def frozen_parameters(*modules: torch.nn.Module | None) -> Iterator[None]:
    """``requires_grad = False`` on every parameter of ``modules`` inside the block (gradients flow to the inputs
    only); each parameter's own flag is restored afterwards, also when the block raises, and also when blocks of
    several threads overlap on one model (restored when the last one leaves)."""
    with _requires_grad([p for m in modules if m is not None for p in m.parameters()], False):
        yield


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` (and its submodules) in eval mode inside the block (dropout off, norms on running statistics);
    each submodule's own ``training`` flag is restored afterwards, also when the block raises, and also when blocks
    of several threads overlap on one module (restored when the last one leaves)."""
    with _training(list(module.modules()), False):
        yield module


def check_autograd_available(what: str) -> None:
    """``what`` differentiates through the model: refuse ``torch.inference_mode``, where autograd cannot run
    (``torch.no_grad`` is fine: the gradient steps enable grad locally)."""
    if torch.is_inference_mode_enabled():
        raise ValueError(f"{what} takes gradients through the model, which torch.inference_mode() disables; call it "
                         "outside inference mode (torch.no_grad() is fine)")
