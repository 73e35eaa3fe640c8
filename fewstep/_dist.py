"""Multi-process evaluation under a distributed launcher (``torchrun``, ``accelerate launch``): which process this
is, checking that every process was given the same run, and splitting a set of samples across the processes
(per-sample seeds make the split invisible in the results)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from ._checks import differing_keys

__all__ = ["check_same_on_all_processes", "distributed_state", "is_main_process", "main_process_value",
           "split_samples"]


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


def check_same_on_all_processes(description: Any, what: str = "settings") -> None:
    """Raise a ``ValueError`` on every process of a distributed launch unless all were given the same
    ``description`` of the work they are about to share (a JSON-able object, e.g. the run's settings); nothing to
    compare in a single process.

    Processes started with different arguments would otherwise split and gather different samples into one wrong
    result, or run different numbers of collectives and hang. Only a digest per entry travels (per key for a
    dict, else of the whole object); the error names each process that differs from process 0 and, for a dict,
    the differing keys with both processes' values. ``what`` names the description in that message."""
    if not isinstance(what, str) or not what.strip():
        raise ValueError(f"`what` must be a non-empty string naming the description, got {what!r}")
    try:
        summary = _summary(description)  # checked in a single process too: a bad description fails everywhere
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`description` must be a JSON-able object (dict keys: strings), got "
                         f"{type(description).__name__}: {exc}") from None
    state = distributed_state()
    if state is None or state.num_processes == 1:
        return
    from accelerate.utils import gather_object

    summaries = gather_object([summary])
    differences = [_differences(rank, summaries[0], theirs) for rank, theirs in enumerate(summaries) if rank]
    differences = [d for d in differences if d]
    if differences:
        raise ValueError(f"the {state.num_processes} processes of this distributed launch were given different "
                         f"{what}: {'; '.join(differences)}; start every process with the same arguments")


def _summary(description: Any) -> dict[str, tuple[str, str]]:
    """``{key: (digest, short text)}`` of a dict's entries, or ``{"": ...}`` of any other JSON-able object."""
    items = description.items() if isinstance(description, dict) else [("", description)]
    out = {}
    for key, value in items:
        if not isinstance(key, str):
            raise TypeError(f"key {key!r} is not a string")
        text = json.dumps(value, sort_keys=True, allow_nan=True)
        out[key] = (hashlib.sha256(text.encode()).hexdigest()[:16], text if len(text) <= 100 else text[:97] + "...")
    return out


def _differences(rank: int, first: dict[str, tuple[str, str]], theirs: dict[str, tuple[str, str]]) -> str:
    """How process ``rank``'s summary differs from process 0's, or ``""``."""
    keys = differing_keys({k: v[0] for k, v in first.items()}, {k: v[0] for k, v in theirs.items()})  # digests
    if not keys:
        return ""

    def show(summary: dict[str, tuple[str, str]], key: str, who: int) -> str:
        return f"{summary[key][1]} on process {who}" if key in summary else f"absent on process {who}"

    if keys == [""] and "" in first and "" in theirs:
        return f"process {rank} differs from process 0 ({show(first, '', 0)}, {show(theirs, '', rank)})"
    shown = ", ".join(f"{k!r}: {show(first, k, 0)}, {show(theirs, k, rank)}" for k in keys)
    return f"process {rank} differs from process 0 in {shown}"


def main_process_value(value: Any) -> Any:
    """``value`` as the main process has it, on every process of a distributed launch (``value`` itself in a single
    process)."""
    state = distributed_state()
    if state is None or state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


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
