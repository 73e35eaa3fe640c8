"""Mutation round 9b: quantize()'s wiring (per-channel weight scales per split part, activation ranges over every
calibration batch, the configured p / grids / symmetric flag / bins), and save_quantized / load_quantized round trips
and damage checks, against references written here (numpy brute force, hand-computed layer inputs)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fewstep import quant
from fewstep.quant.quantizers import Histogram, act_qparams_from_range, search_act_range


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_shortcut = nn.Conv2d(6, 3, 1)


class _Up(nn.Module):
    """A diffusers-like up block: its resnet's shortcut sees ``cat([h, skip])`` (4 + 2 channels)."""

    def __init__(self):
        super().__init__()
        self.resnets = nn.ModuleList([_Res()])

    def forward(self, hidden_states, res_hidden_states_tuple):
        return self.resnets[0].conv_shortcut(torch.cat([hidden_states, res_hidden_states_tuple[-1]], 1))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 7, padding=3)
        self.up_blocks = nn.ModuleList([_Up()])
        self.head = nn.Linear(3, 2)

    def forward(self, sample, timestep):
        h = self.stem(sample) + timestep.float().reshape(-1, 1, 1, 1) / 1000
        h = self.up_blocks[0](h, res_hidden_states_tuple=(10 * sample,))
        return self.head(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _setup(cfg_kwargs=None):
    torch.manual_seed(0)
    net = _Net().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # stem rows (98 weights): all on the int8 grid of alpha = 15/16 but their maximum A. Clipping A at 15/16
        # costs one error of A/16 = 8 steps and removes the rounding of the other 97 (about 1/4 step each): L1
        # prefers it, L_2.4 (8^2.4 = 147 vs 97 * 0.056 step^2.4) keeps alpha = 1, and 15/16 is no grid-12 candidate
        amax = 1 + 0.25 * torch.arange(4.0)
        codes = torch.randint(-120, 121, (4, 98), generator=g).float()
        w = codes * (amax * (15 / 16) / 127)[:, None]
        w[:, 0] = amax
        net.stem.weight.copy_(w.reshape(net.stem.weight.shape))
    x = torch.randn(8, 2, 4, 4, generator=g) * torch.rand(8, 2, 4, 4, generator=g).pow(4) * 3  # heavy tails
    cal = quant.CalibrationSet(x, torch.randint(0, 1000, (8,), generator=g), settings={"method": "test"})
    kwargs = {"act_grid": 12, "weight_grid": 16, "p": 1.0, "split_skip": True, "exclude": [], "batch_size": 3}
    cfg = quant.QuantConfig(**{**kwargs, **(cfg_kwargs or {})})
    return net, cal, cfg, quant.quantize(net, cal, cfg)


def _inputs(net, cal):
    """Each layer's input, computed by hand with torch.nn.functional (split layers: their two parts)."""
    with torch.no_grad():
        x, t = cal.sample, cal.timestep
        h = F.conv2d(x, net.stem.weight, net.stem.bias, padding=3) + t.float().reshape(-1, 1, 1, 1) / 1000
        sc = net.up_blocks[0].resnets[0].conv_shortcut
        o = F.conv2d(torch.cat([h, 10 * x], 1), sc.weight, sc.bias)
    return {"stem": [x], "up_blocks.0.resnets.0.conv_shortcut": [h, 10 * x], "head": [o.permute(0, 2, 3, 1)]}


def _brute_force_scales(w: np.ndarray, p: float, grid: int) -> np.ndarray:
    """Per output row: s = alpha max|w| / 127, alpha in {1, 1 - 1/grid, ...}, the first argmin of mean |w - w_hat|^p
    (float32 rounding as the layer does it)."""
    w = w.reshape(w.shape[0], -1).astype(np.float32)
    amax = np.abs(w).max(1)
    best_s, best_e = None, None
    for k in range(grid):
        s = (amax * np.float32(1 - k / grid) / np.float32(127)).astype(np.float32)
        w_hat = np.clip(np.round(w / s[:, None]), -127, 127) * s[:, None]
        e = (np.abs(w.astype(np.float64) - w_hat) ** p).mean(1)
        if best_s is None:
            best_s, best_e = s.copy(), e
        else:
            better = e < best_e
            best_s, best_e = np.where(better, s, best_s), np.where(better, e, best_e)
    return best_s


def test_quantize_weight_scales_are_the_per_part_brute_force_lp_argmin_with_the_configured_p_and_grid():
    """Kills: weight search with act_grid, with p = 2.4 instead of config.p, a split part's rows permuted."""
    net, _, cfg, q = _setup()
    layers = quant.quant_layers(q)
    assert set(layers) == {"stem", "up_blocks.0.resnets.0.conv_shortcut", "head"}
    assert layers["up_blocks.0.resnets.0.conv_shortcut"].split == 4  # h has 4 channels, the skip 2
    for name, layer in layers.items():
        w = dict(net.named_modules())[name].weight.detach().numpy()
        parts = [w] if not layer.split else [w[:, :layer.split], w[:, layer.split:]]
        for g, part in enumerate(parts):
            # scales are float32: equal to float32 rounding of the same arithmetic
            np.testing.assert_allclose(layer.weight_scale(g).numpy(), _brute_force_scales(part, cfg.p, cfg.weight_grid),
                                       rtol=1e-6, atol=0)
    # the construction discriminates: p = 2.4, or the activation grid, gives other scales
    w = net.stem.weight.detach().numpy()
    assert not np.allclose(_brute_force_scales(w, 2.4, 16), _brute_force_scales(w, 1.0, 16), rtol=1e-6, atol=0)
    assert not np.allclose(_brute_force_scales(w, 1.0, 12), _brute_force_scales(w, 1.0, 16), rtol=1e-6, atol=0)


# (bins 16: a histogram coarse enough that its range search differs from 2048 bins on this data, checked by hand)
@pytest.mark.parametrize("cfg_kwargs", [{}, {"symmetric_act": True, "bins": 16}, {"p": 3.0, "act_grid": 30}])
def test_quantize_activation_ranges_cover_every_batch_and_use_the_configured_search(cfg_kwargs):
    """The observed range of each input part is its min/max over all calibration rows (batch_size 3 < 8 rows), and
    the activation quantizer is the range search with the config's metric, p, grid, bins and symmetric flag on that
    part's histogram (built here from the hand-computed inputs). Kills: ranges of the last batch only, symmetric flag
    or p or bins not passed on."""
    net, cal, cfg, q = _setup(cfg_kwargs)
    layers = quant.quant_layers(q)
    for name, parts in _inputs(net, cal).items():
        observed = q.fewstep_quant["layers"][name]["observed"]
        assert len(observed) == len(parts)
        for g, x in enumerate(parts):
            assert observed[g] == [float(x.min()), float(x.max())]  # exact: min/max select values
            hist = Histogram(float(x.min()), float(x.max()), cfg.bins)
            hist.add(x)
            lo, hi = search_act_range(hist, cfg.metric, cfg.p, cfg.act_grid, cfg.format, cfg.symmetric_act)
            want = act_qparams_from_range(lo, hi, cfg.format)
            got = layers[name].act[g]
            assert got.zero_point == want.zero_point and got.scale == pytest.approx(want.scale, rel=1e-9), (name, g)
            if cfg.symmetric_act:  # [-c, c] centres the asymmetric int8 grid: zero point 0, or -1 where float
                assert got.zero_point in (0, -1)  # rounding puts -c / scale just above the -127.5 tie
    assert q.fewstep_quant["calibration"] == {"method": "test", "rows": 8}


def _assert_same_quantization(a: nn.Module, b: nn.Module) -> None:
    la, lb = quant.quant_layers(a), quant.quant_layers(b)
    assert set(la) == set(lb)
    for name, x in la.items():
        y = lb[name]
        assert (x.split, x.mode, x.act) == (y.split, y.mode, y.act), name
        for g in range(x.groups):
            assert torch.equal(x.weight_q(g), y.weight_q(g)) and torch.equal(x.weight_scale(g), y.weight_scale(g))
        assert torch.equal(x.bias, y.bias)


@pytest.mark.parametrize("mode", ["dequant", "int8"])
def test_round_trip_is_bit_for_bit_the_in_memory_quantization(tmp_path, mode):
    """Kills: zero points or split act order lost, the mode argument ignored, the loaded model's metadata (split,
    norms) not the saved one."""
    net, cal, _, q = _setup()
    quant.save_quantized(q, tmp_path / "q")
    loaded = quant.load_quantized(net, tmp_path / "q", mode=mode)
    quant.set_mode(q, mode)
    _assert_same_quantization(q, loaded)
    batch = next(cal.batches(8))
    with torch.no_grad():
        assert torch.equal(loaded(**batch), q(**batch))
    info, want = loaded.fewstep_quant, q.fewstep_quant
    assert info["config"] == want["config"] and info["calibration"] == want["calibration"]
    assert info["layers"] == {k: {"split": v["split"]} for k, v in want["layers"].items()}
    assert info["fingerprint"] == {k: want["fingerprint"][k] for k in ("arch", "weights", "norms", "projections")}
    # the loaded model saves again to the same tensors (what FewstepPipeline re-saves)
    quant.save_quantized(loaded, tmp_path / "again")
    first, second = load_file(str(tmp_path / "q" / "quant.safetensors")), load_file(str(tmp_path / "again" /
                                                                                        "quant.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_save_without_model_id_loads_under_any_model_id_and_strict_needs_the_exact_weights(tmp_path):
    net, _, _, q = _setup()
    quant.save_quantized(q, tmp_path / "anon")
    quant.load_quantized(net, tmp_path / "anon", model_id="whatever")  # no recorded name: nothing to compare
    quant.save_quantized(q, tmp_path / "named", model_id="a")
    with pytest.raises(ValueError, match="`model_id` is 'b'"):
        quant.load_quantized(net, tmp_path / "named", model_id="b")
    nudged = _Net()
    nudged.load_state_dict(net.state_dict())
    with torch.no_grad():
        nudged.head.weight[0, 0] += 1e-6  # far inside the norm/projection tolerances, but other float32 weights
    quant.load_quantized(nudged, tmp_path / "anon")
    with pytest.raises(ValueError, match="strict=True requires the exact float32 weights"):
        quant.load_quantized(nudged, tmp_path / "anon", strict=True)


def _damaged(tmp_path, q, name, edit):
    quant.save_quantized(q, tmp_path / "q")
    folder = tmp_path / name
    shutil.copytree(tmp_path / "q", folder)
    tensors = load_file(str(folder / "quant.safetensors"))
    edit(tensors)
    header = {"format": "pt", "save_id": json.loads((folder / "quant.json").read_text())["save_id"]}
    save_file(tensors, str(folder / "quant.safetensors"), metadata=header)
    return folder


def _negate(t):
    t["stem.weight_q0"] = -t["stem.weight_q0"]


def _roll(t):  # the codes of each kernel row shifted by one column: same norm, other weights
    t["stem.weight_q0"] = t["stem.weight_q0"].roll(1, dims=-1)


def _halve(t):
    t["stem.weight_scale0"] = t["stem.weight_scale0"] / 2


def _code_minus_128(t):
    t["stem.weight_q0"] = t["stem.weight_q0"].clone()
    t["stem.weight_q0"].view(-1)[0] = -128


@pytest.mark.parametrize(("edit", "message"), [
    (_negate, "a projection differs"),  # projections flip sign: a change of ~2x an O(1) value (tolerance 0.25)
    (_roll, "a projection differs"),  # here a projection moves by 2.18 (O(1) for other weights)
    (_halve, "have norm"),  # norm halves, far outside 2^-3; projections (normalised) do not move
    (_code_minus_128, "holds the code -128"),  # the symmetric int8 grid is [-127, 127]
])
def test_damaged_stored_weights_are_refused(tmp_path, edit, message):
    """Kills: the stored codes not copied in (the check then sees the float weights re-rounded), a loose projection
    or norm tolerance, -128 accepted as an int8 weight code."""
    net, _, _, q = _setup()
    folder = _damaged(tmp_path, q, "bad", edit)
    with pytest.raises(ValueError, match=message):
        quant.load_quantized(net, folder)


@pytest.fixture(scope="module")
def pipe():
    from test_guided_pipeline import _pipe, _unet  # a tiny random class-conditional UNet (8x8, 10 classes)

    return _pipe(_unet(), "ddim")


def test_calibration_follows_the_guidance_scale_and_starts_from_the_seeded_noise(pipe):
    """CFG at scale 1 runs the conditional model only (one row per sample, no null-class row) and the settings record
    the scale used; with ``uniform`` (no NDTC draws taken from the generator) the input recorded at the first,
    noisiest step (diffusion index T - 1) is x_T = init_noise_sigma * randn from a generator seeded with ``seed``,
    the same x_T in both CFG rows (6 samples over 3 kept steps: 2 trajectories). Kills: the pipeline run at another
    guidance scale, the settings' scale fixed."""
    steps = 3
    plain = quant.build_calibration_set(pipe, num_samples=6, steps=steps, method="uniform", num_steps_kept=steps,
                                        guidance_scale=1.0, seed=4)
    assert len(plain) == 2 * steps and not bool((plain.class_labels == pipe.null_class).any())
    assert plain.settings["guidance_scale"] == 1.0
    guided = quant.build_calibration_set(pipe, num_samples=6, steps=steps, method="uniform", num_steps_kept=steps,
                                         guidance_scale=2.0, seed=4)
    assert len(guided) == 2 * 2 * steps and guided.settings["guidance_scale"] == 2.0
    cfg = pipe.unet.config
    gen = torch.Generator().manual_seed(4)
    x_t = torch.randn((2, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=gen)  # ceil(6 / 3) trajectories
    x_t = x_t * pipe.scheduler.init_noise_sigma
    for cal, copies in ((plain, 1), (guided, 2)):
        first = cal.sample[cal.diffusion_index == steps - 1]
        torch.testing.assert_close(first, x_t.repeat(copies, 1, 1, 1), rtol=0, atol=0)  # the same tensor, copied
    # after the first step the guided trajectory differs from the conditional-only one
    later = plain.diffusion_index == 0
    cond = (guided.diffusion_index == 0) & (guided.class_labels != pipe.null_class)
    assert float((plain.sample[later] - guided.sample[cond]).abs().max()) > 1e-3


def test_kl_metric_searches_weights_with_the_lp_distance():
    """``kl`` has no per-channel weight form: weights use L_p with the config's p (here 1, which clips the stem rows
    at 15/16, where the L2 of ``mse`` keeps alpha = 1: see ``_setup``). Kills: kl weights searched with mse."""
    net, _, cfg, q = _setup({"metric": "kl", "act_grid": 10})
    w = net.stem.weight.detach().numpy()
    np.testing.assert_allclose(q.stem.weight_scale(0).numpy(), _brute_force_scales(w, 1.0, cfg.weight_grid),
                               rtol=1e-6, atol=0)
    assert not np.allclose(_brute_force_scales(w, 1.0, 16), _brute_force_scales(w, 2.0, 16), rtol=1e-6, atol=0)


class _Echo(nn.Module):
    def forward(self, sample, timestep, class_labels=None):
        return sample


def test_record_keeps_a_requested_row_of_the_second_half_once():
    """A batch whose halves are equal but whose requested row lies in the second half: that row alone is kept (the
    CFG doubling applies only to rows of the first half)."""
    model = _Echo()
    x = torch.arange(2.0).reshape(2, 1, 1, 1).repeat(2, 1, 1, 1)  # [0, 1, 0, 1]
    labels = torch.tensor([1, 2, 10, 10])

    def run():
        model(x, torch.tensor(5), class_labels=labels)

    recs = quant.record_denoiser_inputs(model, run, 1, want=lambda d: torch.tensor([2]))
    assert len(recs) == 1 and recs[0]["class_labels"].tolist() == [10] and recs[0]["sample"].flatten().tolist() == [0.0]
