"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from _helpers import TinyDenoiser


def _share_cores_between_xdist_workers() -> None:
    """Under ``pytest -n N`` each worker process would start one torch thread per core (N times too many): give each
    its share of the cores instead."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_cores_between_xdist_workers()


@pytest.fixture
def tiny_denoiser() -> TinyDenoiser:
    return TinyDenoiser(3 * 8 * 8)


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """A random-weights (seed 0) Inception-V3 feature extractor, in eval mode, and its weights saved as pytorch-fid's
    file (``pt_inception-2015-12-05-6726825d.pth``: the state dict plus the 1008-class ``fc`` head that file holds):
    ``(net, path)``. Built once per session (22M parameters to initialise, ~90 MB to write); do not modify."""
    from fewstep.bench.inception import InceptionV3Features

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = InceptionV3Features().eval()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({**net.state_dict(), "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, path)
    return net, path
