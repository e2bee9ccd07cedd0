"""cpu_rms_norm (csrc/norms.cpp): transformers' BitNetRMSNorm, after the residual add (mode 1) or BitNet's
squared-ReLU gate (mode 2), in one call, against the torch operations it replaces (bitmodels.bitnet.ops), on
fresh random rows of odd and BitNet lengths: the same bits (the mean of squares is torch's own)."""
from __future__ import annotations

import os

import pytest
import torch

from bitmodels.bitnet.ops import rms_norm


def fresh_generator():
    seed = int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(seed), seed


def torch_reference(a, b, weight, eps, mode):
    """(h, y) as bitmodels.bitnet.ops computes them with torch operations."""
    if mode == 1:
        h = a + b
        return h, rms_norm(h, weight, eps)
    if mode == 2:
        return None, rms_norm(torch.relu(a).square() * b, weight, eps)
    return None, rms_norm(a, weight, eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("rows, k", [(1, 2560), (1, 6912), (3, 7), (2, 1), (5, 1000)])
def test_matches_the_torch_operations(cpp_ops, rows, k, mode, dtype):
    gen, seed = fresh_generator()
    a = (torch.randn(rows, k, generator=gen) * 3).to(dtype)
    b = torch.randn(rows, k, generator=gen).to(dtype) if mode else None
    weight = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    h, y = torch.ops.bitlab.cpu_rms_norm(a, b, weight, 1e-5, mode)
    h_want, y_want = torch_reference(a, b, weight, 1e-5, mode)
    assert y.shape == a.shape and y.dtype == dtype
    if mode == 1:
        assert torch.equal(h, h_want), f"seed {seed}"
    else:
        assert h.numel() == 0
    assert torch.equal(y, y_want), f"seed {seed}: {(y != y_want).sum().item()} of {y.numel()} differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_many_rows_in_chunks_on_two_threads(cpp_ops, mode, dtype):
    """Past 2 * 16 rows (a prefill) the passes run in row chunks on the kernel threads: torch's bits still."""
    from backends.cpp_cpu.threads import pinned_threads

    gen, seed = fresh_generator()
    a = (torch.randn(83, 517, generator=gen) * 3).to(dtype)
    b = torch.randn(83, 517, generator=gen).to(dtype) if mode else None
    weight = (torch.rand(517, generator=gen) + 0.5).to(dtype)
    with pinned_threads(2):
        h, y = torch.ops.bitlab.cpu_rms_norm(a, b, weight, 1e-5, mode)
    h_want, y_want = torch_reference(a, b, weight, 1e-5, mode)
    if mode == 1:
        assert torch.equal(h, h_want), f"seed {seed}"
    assert torch.equal(y, y_want), f"seed {seed}"


def test_leading_dimensions_and_strided_rows(cpp_ops):
    gen, seed = fresh_generator()
    a = torch.randn(2, 3, 64, generator=gen).bfloat16()
    b = torch.randn(2, 3, 64, generator=gen).bfloat16()
    weight = torch.rand(64, generator=gen).bfloat16() + 0.5
    h, y = torch.ops.bitlab.cpu_rms_norm(a, b, weight, 1e-6, 1)
    assert h.shape == (2, 3, 64) and y.shape == (2, 3, 64)
    assert torch.equal(h, a + b)
    wide = torch.randn(3, 128, generator=gen).bfloat16()
    _, y_view = torch.ops.bitlab.cpu_rms_norm(wide[:, ::2], None, weight, 1e-6, 0)
    _, y_copy = torch.ops.bitlab.cpu_rms_norm(wide[:, ::2].contiguous(), None, weight, 1e-6, 0)
    assert torch.equal(y_view, y_copy), f"seed {seed}"


# bf16 bit patterns a norm must carry through.  "finite": zeros of both signs, subnormals, the smallest normal, large
# values (their squares still finite), so the rows' norms stay finite; "nonfinite": also the extremes, infinities,
# quiet and signalling NaNs (a row holding one has a NaN or infinite mean of squares).
SPECIAL_BF16 = {
    "finite": [0x0000, 0x8000, 0x0001, 0x807F, 0x0080, 0x8080, 0x4F00, 0xCF00],
    "nonfinite": [0x0000, 0x8000, 0x0001, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81],
}


def special_rows(gen, rows, k, kind):
    """bf16 rows of random values with the `kind` special patterns scattered in."""
    a = (torch.randn(rows, k, generator=gen) * 4).bfloat16()
    patterns = SPECIAL_BF16[kind] * 3
    where = torch.randint(0, rows * k, (len(patterns),), generator=gen)
    a.view(torch.int16).view(-1)[where] = torch.tensor(patterns, dtype=torch.int32).to(torch.int16)
    return a


def same_bits(x, y):
    """Bit for bit (signed zeros apart), NaN where the other has NaN (which NaN a product of two NaNs gives
    depends on operand order, so payloads are not compared)."""
    nan = x.isnan()
    return torch.equal(nan, y.isnan()) and torch.equal(x.view(torch.int16)[~nan], y.view(torch.int16)[~nan])


@pytest.mark.parametrize("kind", ["finite", "nonfinite"])
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("rows, k", [(1, 6912), (2, 2560), (3, 13), (1, 7), (4, 1003)])
def test_the_avx2_loops_give_the_scalar_bits(cpp_ops, rows, k, mode, kind):
    """bfloat16 rows run through AVX2 loops where the CPU has AVX2: the same bits as the scalar loops, special
    values (NaN, infinities, subnormals, signed zeros) and tails of fewer than eight values included."""
    if "avx2" not in torch.ops.bitlab.cpu_features().split(" (")[0].split():
        pytest.skip("the CPU has no AVX2: only the scalar loops run")
    gen, seed = fresh_generator()
    a = special_rows(gen, rows, k, kind)
    b = special_rows(gen, rows, k, kind) if mode else None
    weight = (torch.rand(k, generator=gen) + 0.5).bfloat16()
    if kind == "nonfinite":
        weight.view(torch.int16)[k // 2] = 0x7FC0  # a NaN weight too
    try:
        torch.ops.bitlab.cpu_set_isa(0)
        h_scalar, y_scalar = torch.ops.bitlab.cpu_rms_norm(a, b, weight, 1e-5, mode)
        torch.ops.bitlab.cpu_set_isa(1)
        h_avx2, y_avx2 = torch.ops.bitlab.cpu_rms_norm(a, b, weight, 1e-5, mode)
    finally:
        torch.ops.bitlab.cpu_set_isa(-1)
    assert same_bits(h_avx2, h_scalar), f"seed {seed}"
    assert same_bits(y_avx2, y_scalar), f"seed {seed}"
    if kind == "finite":
        assert not y_avx2.isnan().any(), f"seed {seed}"  # the comparison above was of numbers


@pytest.mark.parametrize("kind", ["finite", "nonfinite"])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_special_values_as_the_torch_operations(cpp_ops, mode, kind):
    """Against torch on rows with special values: the same numbers, NaN where torch has NaN."""
    gen, seed = fresh_generator()
    a = special_rows(gen, 3, 300, kind)
    b = special_rows(gen, 3, 300, kind) if mode else None
    weight = (torch.rand(300, generator=gen) + 0.5).bfloat16()
    h, y = torch.ops.bitlab.cpu_rms_norm(a, b, weight, 1e-5, mode)
    h_want, y_want = torch_reference(a, b, weight, 1e-5, mode)
    if mode == 1:
        assert same_bits(h, h_want), f"seed {seed}"
    assert same_bits(y, y_want), f"seed {seed}"


def test_bad_inputs_are_named(cpp_ops):
    a = torch.randn(2, 16).bfloat16()
    w = torch.ones(16).bfloat16()
    with pytest.raises(RuntimeError, match="mode 3 is not 0"):
        torch.ops.bitlab.cpu_rms_norm(a, None, w, 1e-5, 3)
    with pytest.raises(RuntimeError, match="a must be a float32 or bfloat16 CPU tensor, got Half"):
        torch.ops.bitlab.cpu_rms_norm(a.half(), None, w.half(), 1e-5, 0)
    with pytest.raises(RuntimeError, match=r"weight must be \[16\] BFloat16"):
        torch.ops.bitlab.cpu_rms_norm(a, None, torch.ones(8).bfloat16(), 1e-5, 0)
    with pytest.raises(RuntimeError, match="mode 1 needs b shaped like a"):
        torch.ops.bitlab.cpu_rms_norm(a, a[:1], w, 1e-5, 1)
