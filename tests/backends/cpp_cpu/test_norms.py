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
