"""`step` does tensor arithmetic only: it runs on the meta device and inside a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from fewstep import samplers

CONFIGS = [{}, {"prediction_type": "v_prediction"}, {"solver_order": 3}, {"shift": 3.0}]


def _make(name: str, extra: dict):
    cls = samplers.get(name)
    keys = cls._get_init_keys(cls)
    return cls(**{k: v for k, v in extra.items() if k in keys})


@pytest.mark.parametrize("extra", CONFIGS)
@pytest.mark.parametrize("name", samplers.names("diffusion"))
def test_full_loop_on_meta_device(name, extra):
    """Any .item(), .cpu() or tensor-valued `if` inside step fails on meta tensors."""
    sched = _make(name, extra)
    sched.set_timesteps(10, device="meta")
    assert sched.timesteps.device.type == "meta"
    x = torch.empty(2, 4, 8, 8, device="meta")
    for t in sched.timesteps:
        model_output = torch.empty_like(x) * 1.0
        x = sched.step(model_output, t, x).prev_sample
    assert x.device.type == "meta" and x.shape == (2, 4, 8, 8)
    assert sched.step_index == 10


@pytest.mark.parametrize("name", samplers.names("diffusion"))
def test_step_pair_on_meta_device(name):
    sched = samplers.get(name)()
    sched.set_timesteps(6, device="meta")
    x = torch.empty(1, 3, 4, 4, device="meta", dtype=torch.float16)
    for t in sched.timesteps:
        x = sched.step_pair(torch.empty_like(x), torch.empty_like(x), t, x).prev_sample
    assert x.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", samplers.names("diffusion"))
def test_ten_step_loop_captured_in_cuda_graph(name):
    device = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    weight = (torch.randn(64, 64, generator=g) / 8).to(device)

    def model(x, t):
        return torch.tanh(x @ weight) * (0.5 + t.float() / 1000) + 0.1 * x

    def loop(sched, x):
        sched.set_timesteps(10, device=device)
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
        return x

    x_init = torch.randn(4, 64, generator=g).to(device)
    eager = loop(samplers.get(name)(), x_init.clone())

    sched = samplers.get(name)()
    static_x = x_init.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loop(sched, static_x.clone())  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    sched.set_timesteps(10, device=device)  # host-side plan, built before capture
    with torch.cuda.graph(graph):
        x = static_x
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
        static_out = x
    static_x.copy_(x_init)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, eager, rtol=1e-5, atol=1e-5)
    # Replaying from another start reuses the captured plan.
    static_x.copy_(x_init * 0.5)
    graph.replay()
    expected = loop(samplers.get(name)(), x_init * 0.5)
    torch.testing.assert_close(static_out, expected, rtol=1e-5, atol=1e-5)
