import pytest
import torch

from bitcore.config import BitQuantConfig
from bitcore.errors import QuantizationError
from bitcore.quantize import (
    binarize, fake_quantize_activation, fake_quantize_weight, quantize_activation_binary,
    quantize_activation_int8, quantize_weight,
)


def test_ternary_absmean_hand_computed():
    w = torch.tensor([[0.2, -0.9, 0.05, 1.5]])
    values, scale = quantize_weight(w, BitQuantConfig(weight_bits=1.58))
    assert scale.item() == pytest.approx((0.2 + 0.9 + 0.05 + 1.5) / 4)  # 0.6625
    assert values.tolist() == [[0, -1, 0, 1]]  # 0.2/0.6625=0.30 -> 0; -1.36 -> -1; 2.26 -> clamp 1


def test_binary_sign_mean_abs_hand_computed():
    w = torch.tensor([[0.5, -1.5], [0.0, -2.0]])
    values, scale = quantize_weight(w, BitQuantConfig(weight_bits=1, weight_granularity="per_channel"))
    assert values.tolist() == [[1, -1], [1, -1]]  # sign(0) = +1
    assert scale.tolist() == [1.0, 1.0]


def test_int2_four_level_grid():
    w = torch.tensor([[3.0, 1.2, 0.1, -0.1, -2.5, -3.0]])  # mean|w| = 1.65 -> s = 0.624 * 1.65 = 1.0296
    values, scale = quantize_weight(w, BitQuantConfig(weight_bits=2))
    assert scale.item() == pytest.approx(0.624 * 1.65)
    assert values.tolist() == [[3, 1, 1, -1, -3, -3]]  # 2.91 -> 3, 1.17 -> 1, 0.097 -> 1, -2.43 -> -3


def test_int2_scale_keeps_gaussian_error_small():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    values, scale = quantize_weight(w, BitQuantConfig(weight_bits=2))
    rel = ((values.float() * scale - w) ** 2).mean() / (w ** 2).mean()
    assert rel < 0.13  # an absmax scale gives ~0.98 here


@pytest.mark.parametrize("bits,qmax,expected", [(4, 7, [7, -4, 2, -7]), (8, 127, [127, -76, 38, -127])])
def test_int_absmax(bits, qmax, expected):
    w = torch.tensor([[1.0, -0.6, 0.3, -1.0]])  # -0.6*7 = -4.2, 0.3*7 = 2.1, -0.6*127 = -76.2, 0.3*127 = 38.1
    values, scale = quantize_weight(w, BitQuantConfig(weight_bits=bits))
    assert scale.item() == pytest.approx(1.0 / qmax)
    assert values.tolist() == [expected]


def test_per_group_scales_shape_and_partial_last_group():
    w = torch.randn(3, 10)
    cfg = BitQuantConfig(weight_bits=1.58, weight_granularity="per_group", group_size=4)
    values, scale = quantize_weight(w, cfg)
    assert scale.shape == (3, 3)
    assert scale[:, 2] == pytest.approx(w[:, 8:].abs().mean(dim=1))


def test_nan_weight_is_rejected_with_count():
    w = torch.randn(4, 4)
    w[1, 2] = float("nan")
    w[0, 0] = float("inf")
    with pytest.raises(QuantizationError, match="2 NaN/Inf"):
        quantize_weight(w, BitQuantConfig())


def test_int8_activation_per_token_hand_computed():
    x = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.01]])
    q, s = quantize_activation_int8(x, "per_token")
    assert q.tolist() == [[64, -127, 32], [127, 0, -1]]  # 63.5 rounds half-to-even -> 64
    assert s.flatten().tolist() == pytest.approx([1 / 127, 2 / 127])
    q, s = quantize_activation_int8(x, "per_tensor")
    assert s.flatten().tolist() == pytest.approx([2 / 127, 2 / 127])


def test_binary_activation_signs_and_scale():
    x = torch.tensor([[0.5, -1.5, 0.0]])
    signs, s = quantize_activation_binary(x, "per_token")
    assert signs.tolist() == [[1, -1, 1]]
    assert s.item() == pytest.approx(2 / 3)


def test_weight_ste_gradient_is_identity():
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64)
    fake_quantize_weight(w, BitQuantConfig()).backward(g)
    assert torch.equal(w.grad, g)


def test_int8_activation_ste_gradient_is_identity():
    x = torch.randn(3, 9, requires_grad=True)
    g = torch.randn(3, 9)
    fake_quantize_activation(x, BitQuantConfig(activation_dtype="int8")).backward(g)
    assert torch.equal(x.grad, g)


def test_binary_ste_gradient_is_clipped_identity():
    x = torch.tensor([-2.0, -0.5, 0.3, 1.0, 1.5], requires_grad=True)
    binarize(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
