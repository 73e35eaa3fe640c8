"""Parity of ``fewstep.bench.inception`` with pytorch-fid's ``InceptionV3([3])`` (the network FID is defined with).

Offline there are no real weights, so both networks get the same random weights: a state dict in the layout of
pytorch-fid's weights file (``pt_inception-2015-12-05-6726825d.pth``), handed to pytorch-fid in place of its
download and saved as the file fewstep loads. pytorch-fid loads it strictly (same parameter names and shapes);
the pool features must then agree on random images of an odd size (the resize is part of the convention).

Needs pytorch-fid and a torchvision built for the installed torch: ``pip install "fewstep[fid-parity]"`` (see the
README); skipped otherwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewstep.bench import inception as fewstep_inception
from fewstep.bench.inception import InceptionV3Features, inception_features, load_inception


def _pytorch_fid():
    """pytorch-fid's ``inception`` module, or a skip saying why it cannot be used here."""
    try:
        from pytorch_fid import inception
    except ImportError as exc:
        pytest.skip(f"pytorch-fid is not installed (pip install 'fewstep[fid-parity]'): {exc}")
    except (RuntimeError, OSError) as exc:  # e.g. a CUDA torchvision wheel whose C ops do not load on a CPU torch
        pytest.skip(f"pytorch-fid's torchvision does not load against this torch: {exc}")
    return inception


def random_fid_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the layout of pytorch-fid's weights file with random values that keep activations O(1)
    through the 94 layers: He-scaled convolutions, batch-norm affine and running statistics near identity, a
    1008-class head (unused by the features)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in InceptionV3Features().state_dict().items():
        if name.endswith("conv.weight"):
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name.endswith(("bn.weight", "bn.running_var")):
            value = 0.6 + 0.8 * torch.rand(value.shape, generator=g)
        elif name.endswith(("bn.bias", "bn.running_mean")):
            value = 0.1 * torch.randn(value.shape, generator=g)
        state[name] = value
    state["fc.weight"] = 0.01 * torch.randn(1008, 2048, generator=g)
    state["fc.bias"] = torch.zeros(1008)
    return state


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """``(pytorch-fid's InceptionV3([3]), fewstep's network)`` with the same random weights."""
    inception = _pytorch_fid()
    state = random_fid_state()
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    with pytest.MonkeyPatch.context() as mp:  # pytorch-fid's download returns our state dict (loaded strictly)
        mp.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: dict(state))
        theirs = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    return theirs, load_inception(path)


def _images() -> torch.Tensor:
    return torch.rand(3, 3, 37, 53, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _their_features(theirs, images: torch.Tensor) -> torch.Tensor:
    return theirs(images)[0].flatten(1).double()


def test_pool_features_match_pytorch_fid(networks):
    theirs, ours = networks
    images = _images()
    expected = _their_features(theirs, images)
    got = inception_features(ours, images)
    assert got.shape == (3, 2048) and expected.abs().mean() > 0.1  # the random weights keep features O(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # grayscale input is the same image repeated over RGB, as pytorch-fid gets it after convert("RGB")
    gray = images[:, :1]
    torch.testing.assert_close(inception_features(ours, gray), _their_features(theirs, gray.expand(-1, 3, -1, -1)),
                               rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_parity_check_detects_a_pooling_difference(networks, monkeypatch):
    """The comparison can fail: torchvision's padded average pool instead of the FID graph's is caught."""
    theirs, ours = networks
    monkeypatch.setattr(fewstep_inception, "_avg_pool", lambda x: F.avg_pool2d(x, 3, stride=1, padding=1))
    images = _images()
    expected = _their_features(theirs, images)
    diff = (inception_features(ours, images) - expected).abs().max()
    assert diff > 1e-3 * expected.abs().max()
