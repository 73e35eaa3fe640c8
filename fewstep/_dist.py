"""Multi-process evaluation under ``accelerate launch``: which process this is, and splitting a set of samples
across the processes (per-sample seeds make the split invisible in the results)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

__all__ = ["distributed_state", "is_main_process", "split_samples"]


def distributed_state():
    """accelerate's ``PartialState`` when running under a distributed launcher (``WORLD_SIZE`` > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def is_main_process() -> bool:
    """True unless this is a non-main process of a distributed launch."""
    state = distributed_state()
    return state is None or state.is_main_process


def split_samples(n: int, make: Callable[[list[int]], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """``make(indices) -> [len(indices), ...]`` for all ``n`` samples, and the wall time. Under ``accelerate launch``
    each process makes a contiguous share (the per-sample seeds make it the same samples) and the shares are
    gathered onto every process; the time is the slowest share's."""
    state = distributed_state()
    if state is None or state.num_processes == 1:
        start = time.perf_counter()
        out = make(list(range(n)))
        return out, time.perf_counter() - start
    from accelerate.utils import gather_object

    chunk = -(-n // state.num_processes)
    mine = list(range(state.process_index * chunk, min(n, (state.process_index + 1) * chunk)))
    start = time.perf_counter()
    part = make(mine) if mine else None
    shares = gather_object([(mine, part, time.perf_counter() - start)])
    full = [p for idx, p, _ in shares if idx]
    out = torch.zeros(n, *full[0].shape[1:], dtype=full[0].dtype)
    for idx, p, _ in shares:
        if idx:
            out[torch.tensor(idx)] = p
    return out, max(sec for _, _, sec in shares)
