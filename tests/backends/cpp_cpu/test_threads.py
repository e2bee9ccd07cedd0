"""The cpp_cpu kernels' thread count (following torch by default, pinned inside pinned_threads, same results) and
their helpers' spin between calls (pool_spin)."""
from __future__ import annotations

import pytest
import torch

from backends.cpp_cpu.kernels import CppInt8ActivationKernel
from backends.cpp_cpu.threads import kernel_threads, pinned_threads, pool_spin, pool_spin_us
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


def _ternary_problem(seed: int, out_features: int, in_features: int, tokens: int):
    """(kernel, prepared weight, x): a W1.58A8 cpp_cpu layer of random ternary weights and random inputs."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(-1, 2, (out_features, in_features), generator=gen, dtype=torch.int8)
    kernel = CppInt8ActivationKernel()
    packed = pack_weight(values, torch.tensor([0.03]), 1.58, "per_tensor")
    return kernel, kernel.prepare(packed, BitQuantConfig(weight_bits=1.58)), torch.randn(tokens, in_features, generator=gen)


def test_results_do_not_depend_on_the_thread_count(cpp_ops):
    kernel, prepared, x = _ternary_problem(5, 700, 1300, 3)
    with pinned_threads(1):
        one = kernel.forward(x, prepared)
    with pinned_threads(3):
        three = kernel.forward(x, prepared)
    assert torch.equal(one, three)


def test_pool_spin_is_set_inside_the_block_and_restored(cpp_ops):
    default = pool_spin_us()
    assert default >= 0
    with pool_spin(1500) as us:
        assert us == 1500 and pool_spin_us() == 1500
        with pool_spin(0):
            assert pool_spin_us() == 0
        assert pool_spin_us() == 1500
    assert pool_spin_us() == default
    with pytest.raises(RuntimeError, match="inside"):
        with pool_spin(700):
            raise RuntimeError("inside")
    assert pool_spin_us() == default


def test_the_default_spin_comes_back_for_a_negative_setting(cpp_ops):
    default = pool_spin_us()
    before = torch.ops.bitlab.cpu_set_pool_spin(123)
    assert before == default and pool_spin_us() == 123
    assert torch.ops.bitlab.cpu_set_pool_spin(-1) == 123
    assert pool_spin_us() == default


@pytest.mark.parametrize("us", [-1, 2.5, True, "100"])
def test_bad_spins_are_named(cpp_ops, us):
    with pytest.raises(ValueError, match="non-negative int"):
        with pool_spin(us):
            pass


@pytest.mark.parametrize("us", [0, 5000])
def test_results_do_not_depend_on_the_spin(cpp_ops, us):
    kernel, prepared, x = _ternary_problem(6, 900, 517, 2)
    with pinned_threads(2):
        expected = kernel.forward(x, prepared)
        with pool_spin(us):
            got = [kernel.forward(x, prepared) for _ in range(3)]
    assert all(torch.equal(g, expected) for g in got)
