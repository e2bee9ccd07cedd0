"""Every STE quantizer's backward against the derivative of its definition, by torch.autograd.gradcheck.

A straight-through estimator pairs a quantized forward ``q`` with the gradient
of a smooth surrogate ``s`` (bitcore.quantize's docstring): ``s(w) = w`` for
weights and int8 activations, ``s(x) = scale * clamp(x, -1, 1)`` (scale held
constant) for binary activations, ``clamp(x, -1, 1)`` for ``binarize``.

gradcheck compares autograd's gradient with finite differences of the forward.
The probe ``g(x) = q(x) + (s(x) - q(x)).detach()`` has the forward value of
``s`` but the backward of ``q``, so gradcheck on ``g`` passes exactly when
``q``'s STE backward equals the true Jacobian of ``s``.
"""
from __future__ import annotations

import pytest
import torch

from bitcore.config import WEIGHT_BITS, BitQuantConfig
from bitcore.quantize import binarize, fake_quantize_activation, fake_quantize_weight, quantize_activation_binary


def _probe(q, s):
    return lambda x: q(x) + (s(x) - q(x)).detach()


def _away_from_kinks(shape, generator, scale=1.5):
    """float64 values spread over +-``scale`` but never within 0.01 of the hardtanh kinks at +-1."""
    x = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale
    near = (x.abs() - 1).abs() < 0.01
    return torch.where(near, x * 0.9, x).requires_grad_(True)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
def test_weight_ste_is_the_identity_jacobian(bits, granularity):
    g = torch.Generator().manual_seed(WEIGHT_BITS.index(bits) * 10 + len(granularity))
    cfg = BitQuantConfig(weight_bits=bits, weight_granularity=granularity, group_size=4)
    w = torch.randn(5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_probe(lambda t: fake_quantize_weight(t, cfg), lambda t: t), (w,))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_int8_activation_ste_is_the_identity_jacobian(granularity):
    g = torch.Generator().manual_seed(7)
    cfg = BitQuantConfig(activation_dtype="int8", activation_granularity=granularity)
    x = torch.randn(2, 3, 13, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_probe(lambda t: fake_quantize_activation(t, cfg), lambda t: t), (x,))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_binary_activation_ste_is_scaled_hardtanh(granularity):
    g = torch.Generator().manual_seed(11)
    cfg = BitQuantConfig(weight_bits=1, activation_dtype="binary", activation_granularity=granularity)
    x = _away_from_kinks((4, 9), g)
    _, scale = quantize_activation_binary(x.detach(), granularity)  # the constant of the surrogate
    surrogate = lambda t: scale * t.clamp(-1, 1)  # noqa: E731
    assert torch.autograd.gradcheck(_probe(lambda t: fake_quantize_activation(t, cfg), surrogate), (x,))


def test_binarize_ste_is_hardtanh():
    x = _away_from_kinks((3, 17), torch.Generator().manual_seed(3))
    assert torch.autograd.gradcheck(_probe(binarize, lambda t: t.clamp(-1, 1)), (x,))


def test_gradcheck_probe_rejects_a_wrong_definition():
    """The probe can fail: binary activations' backward is not the plain identity."""
    cfg = BitQuantConfig(weight_bits=1, activation_dtype="binary", activation_granularity="per_token")
    x = _away_from_kinks((3, 8), torch.Generator().manual_seed(5))
    probe = _probe(lambda t: fake_quantize_activation(t, cfg), lambda t: t)
    assert not torch.autograd.gradcheck(probe, (x,), raise_exception=False)


@pytest.mark.parametrize("bits", [1, 1.58])
def test_fake_quantized_weight_forward_is_the_quantized_weight(bits):
    """The STE changes only the backward: the forward value is scale * integer values (to rounding of w + (d - w))."""
    from bitcore.quantize import quantize_weight

    cfg = BitQuantConfig(weight_bits=bits, weight_granularity="per_channel")
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(13))
    values, scale = quantize_weight(w, cfg)
    torch.testing.assert_close(fake_quantize_weight(w, cfg), values.float() * scale.view(-1, 1), rtol=0, atol=1e-6)
