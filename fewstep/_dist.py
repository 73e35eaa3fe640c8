"""Multi-process evaluation under a distributed launcher (``torchrun``, ``accelerate launch``): which process this
is, and splitting a set of samples across the processes (per-sample seeds make the split invisible in the results)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

__all__ = ["distributed_state", "is_main_process", "split_samples"]


def distributed_state():
    """accelerate's ``PartialState`` when running under a distributed launcher (``WORLD_SIZE`` > 1), else None.

    The processes compute on the CPU and talk over gloo (``cpu=True``): without it accelerate, finding no CUDA,
    treats every process of a CPU launch (``torchrun --nproc_per_node N``) as a lone main process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=True)


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
    error = None
    try:
        part = make(mine) if mine else None
    except Exception as exc:  # every process must reach the gather: the failure is raised on all of them below
        part, error = None, (type(exc).__name__, str(exc))
    shares = gather_object([(mine, part, time.perf_counter() - start, error)])
    failed = [(rank, err) for rank, (_, _, _, err) in enumerate(shares) if err is not None]
    if failed:
        rank, (kind, message) = failed[0]
        # the same exception type on every process, so callers that tolerate it (the S3 search scores a failed
        # evaluation as inf) stay in step instead of drifting into each other's collectives
        raise _FAILURES.get(kind, RuntimeError)(f"process {rank} of {state.num_processes}: {kind}: {message}")
    full = [p for idx, p, _, _ in shares if idx]
    out = torch.zeros(n, *full[0].shape[1:], dtype=full[0].dtype)
    for idx, p, _, _ in shares:
        if idx:
            out[torch.tensor(idx)] = p
    return out, max(sec for _, _, sec, _ in shares)


_FAILURES: dict[str, type[Exception]] = {"ValueError": ValueError, "FloatingPointError": FloatingPointError}
