"""The numba_cuda plugin: registration, priority, keys, and availability that says why not."""
import importlib.util

import pytest
import torch

from backends.numba_cuda import plugin
from bitcore.config import BitQuantConfig
from bitcore.kernels import KernelKey, Registry


@pytest.fixture
def registry():
    return Registry(builtin=("backends.torch_ref.plugin", "backends.numba_cuda.plugin"), use_entry_points=False)


def test_backend_registers_three_cuda_kernels_at_priority_50(registry):
    kernels = [k for k in registry.kernels() if k.backend == "numba_cuda"]
    assert sorted(type(k).__name__ for k in kernels) == ["NumbaFloatKernel", "NumbaInt8Kernel", "NumbaXnorKernel"]
    for k in kernels:
        assert k.priority == 50 and k.devices == frozenset({"cuda"})


def test_declared_keys():
    floats = plugin.NumbaFloatKernel.keys
    assert KernelKey(1.58, "float16", "per_tensor", "none") in floats
    assert KernelKey(1.0, "bfloat16", "per_channel", "none") in floats
    assert not any(k.weight_granularity == "per_group" for k in floats)
    assert KernelKey(1.58, "int8", "per_channel", "per_token") in plugin.NumbaInt8Kernel.keys
    assert plugin.NumbaXnorKernel.keys == frozenset(
        KernelKey(1.0, "binary", wg, ag) for wg in ("per_tensor", "per_channel") for ag in ("per_tensor", "per_token")
    )
    assert not any(k.weight_bits not in (1.0, 1.58) for k in floats | plugin.NumbaInt8Kernel.keys)


def test_missing_numba_is_reported(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real(name, *a))
    avail = plugin.numba_availability()
    assert not avail and "numba is not installed" in avail.reason


def test_simulator_is_not_a_device(monkeypatch):
    numba = pytest.importorskip("numba")
    monkeypatch.setattr(numba.config, "ENABLE_CUDASIM", 1)
    avail = plugin.numba_availability()
    assert not avail and "NUMBA_ENABLE_CUDASIM" in avail.reason


def test_no_gpu_is_reported(monkeypatch):
    numba = pytest.importorskip("numba")
    monkeypatch.setattr(numba.config, "ENABLE_CUDASIM", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    avail = plugin.numba_availability()
    assert not avail and "no CUDA device" in avail.reason


def test_unavailable_backend_leaves_the_rest_working(registry, monkeypatch):
    monkeypatch.setattr(plugin, "numba_availability", lambda: plugin.Availability.no("numba is not installed"))
    registry.reload()
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="float16")
    exp = registry.explain(cfg, "cuda")
    rejected = {c.kernel: c.reason for c in exp.candidates if c.status == "rejected"}
    assert "numba is not installed" in rejected["numba_cuda.NumbaFloatKernel"]
    assert exp.chosen is not None and exp.chosen.backend == "torch_ref"
    assert registry.get_kernel_for_config(cfg, "cpu").backend == "torch_ref"


@pytest.mark.gpu
def test_chosen_on_cuda_below_cuda_ext_and_forcible(registry):
    if not (torch.cuda.is_available() and plugin.numba_availability()):
        pytest.skip(f"no usable GPU for numba: {plugin.numba_availability().reason}")
    cfg = BitQuantConfig(weight_bits=1.58, activation_dtype="float16")
    assert registry.get_kernel_for_config(cfg, "cuda").name == "numba_cuda.NumbaFloatKernel"
    assert registry.get_kernel_for_config(cfg, "cuda", backend="numba_cuda").backend == "numba_cuda"
