"""Shared fixtures."""

from __future__ import annotations

import pytest
from _helpers import TinyDenoiser


@pytest.fixture
def tiny_denoiser() -> TinyDenoiser:
    return TinyDenoiser(3 * 8 * 8)


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """A random-weights (seed 0) Inception-V3 feature extractor, in eval mode, and its weights saved as pytorch-fid's
    file (``pt_inception-2015-12-05-6726825d.pth``: the state dict plus the 1008-class ``fc`` head that file holds):
    ``(net, path)``. Built once per session (22M parameters to initialise, ~90 MB to write); do not modify."""
    import torch

    from fewstep.bench.inception import InceptionV3Features

    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = InceptionV3Features().eval()
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({**net.state_dict(), "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, path)
    return net, path
