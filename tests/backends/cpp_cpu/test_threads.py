"""The cpp_cpu kernels' thread count: following torch by default, pinned inside pinned_threads, same results."""
from __future__ import annotations

import pytest
import torch

from backends.cpp_cpu.kernels import CppInt8ActivationKernel
from backends.cpp_cpu.threads import kernel_threads, pinned_threads
from bitcore.config import BitQuantConfig
from bitcore.packing import pack_weight


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_follows_torch_by_default_and_pins_inside_the_block(cpp_ops, torch_threads):
    torch.set_num_threads(1)
    assert kernel_threads() == 1
    with pinned_threads(3) as n:
        assert n == 3 and kernel_threads() == 3
        torch.set_num_threads(2)
        assert kernel_threads() == 3  # torch's own setting no longer matters
        with pinned_threads(5):
            assert kernel_threads() == 5
        assert kernel_threads() == 3  # nested blocks restore the outer pin
    assert kernel_threads() == 2  # following torch again


def test_restored_after_an_exception(cpp_ops, torch_threads):
    torch.set_num_threads(1)
    with pytest.raises(RuntimeError, match="inside"):
        with pinned_threads(4):
            raise RuntimeError("inside")
    assert kernel_threads() == 1


@pytest.mark.parametrize("n", [0, -2, 1.5, True, "2"])
def test_bad_counts_are_named(cpp_ops, n):
    with pytest.raises(ValueError, match="positive int"):
        with pinned_threads(n):
            pass


def test_results_do_not_depend_on_the_thread_count(cpp_ops):
    cfg = BitQuantConfig(weight_bits=1.58)
    gen = torch.Generator().manual_seed(5)
    values = torch.randint(-1, 2, (700, 1300), generator=gen, dtype=torch.int8)
    kernel = CppInt8ActivationKernel()
    prepared = kernel.prepare(pack_weight(values, torch.tensor([0.03]), 1.58, "per_tensor"), cfg)
    x = torch.randn(3, 1300, generator=gen)
    with pinned_threads(1):
        one = kernel.forward(x, prepared)
    with pinned_threads(3):
        three = kernel.forward(x, prepared)
    assert torch.equal(one, three)
