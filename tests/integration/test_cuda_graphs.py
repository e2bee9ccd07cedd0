"""CUDA-graph capture and replay of BitLinear models, for every backend that runs on CUDA here."""
from __future__ import annotations

import pytest
import torch

from bitcore.kernels import KernelKey, KernelRegistry
from bitlayers import BitLinear

from .models import CONFIGS

pytestmark = pytest.mark.gpu


def cuda_backends() -> list:
    return sorted({k.backend for k in KernelRegistry.kernels() if "cuda" in k.devices})


def model_for(backend: str, device) -> torch.nn.Sequential:
    """One BitLinear per config the backend serves on CUDA (forced to it), with ReLUs between."""
    kernels = [k for k in KernelRegistry.kernels() if k.backend == backend and "cuda" in k.devices]
    served = [cfg for cfg in CONFIGS if any(k.serves(KernelKey.from_config(cfg)) for k in kernels)]
    if not served:
        pytest.skip(f"{backend} serves none of the test configs on CUDA")
    torch.manual_seed(0)
    layers = []
    for cfg in served:
        layers += [BitLinear(64, 64, quant_config=cfg, backend=backend, fused_activation="relu"), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers).to(device).eval()


@pytest.mark.parametrize("backend", cuda_backends())
def test_capture_and_replay_matches_eager(backend, cuda_device):
    backend_status = next(b for b in KernelRegistry.backends() if b.name == backend)
    if not backend_status.availability:
        pytest.skip(f"{backend} unavailable: {backend_status.availability.reason}")
    m = model_for(backend, cuda_device)
    static_x = torch.randn(8, 64, device=cuda_device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):  # warm-up: kernel choice, self-check and prepare happen here, not during capture
            m(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = m(static_x)
    for _ in range(3):
        x = torch.randn(8, 64, device=cuda_device)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            expected = m(x)
        assert torch.equal(static_y, expected), f"{backend}: replay differs from eager"


def test_compile_reduce_overhead_uses_cuda_graphs_and_matches_eager(cuda_device):
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        BitLinear(64, 48, quant_config=CONFIGS[0]), torch.nn.ReLU(), BitLinear(48, 16, quant_config=CONFIGS[1])
    ).to(cuda_device).eval()
    compiled = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        # One eager call first: prepared weights are cached on first use, and must not be allocated inside
        # the CUDA-graph pool of the compiled model's warm-up (cudagraph trees refuse untracked live tensors).
        m(torch.randn(4, 64, device=cuda_device))
        for _ in range(4):
            x = torch.randn(4, 64, device=cuda_device)
            assert torch.equal(compiled(x).clone(), m(x))
