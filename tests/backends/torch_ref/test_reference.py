"""The reference backend against float64 math written out independently."""
import pytest
import torch

from bitcore.config import BitQuantConfig
from bitcore.packing import pack_weight
from backends.torch_ref.kernels import TorchReferenceKernel

KERNEL = TorchReferenceKernel()
VALUES = {1: [-1, 1], 1.58: [-1, 0, 1], 2: [-3, -1, 1, 3], 4: list(range(-7, 8)), 8: list(range(-127, 128))}


def random_packed(bits, out_f, in_f, granularity, gen, group_size=None):
    choices = torch.tensor(VALUES[bits], dtype=torch.int8)
    values = choices[torch.randint(0, len(choices), (out_f, in_f), generator=gen)]
    shape = {"per_tensor": (1,), "per_channel": (out_f,),
             "per_group": (out_f, -(-in_f // (group_size or 1)))}[granularity]
    scale = torch.rand(shape, generator=gen) + 0.05
    return pack_weight(values, scale, bits, granularity, group_size), values, scale


def dense_weight64(values, scale, granularity, group_size):
    w = values.double()
    if granularity == "per_group":
        full = scale.double().repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
    else:
        full = scale.double().view(-1, 1)
    return w * full


@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
@pytest.mark.parametrize("act", ["float32", "float16", "bfloat16"])
def test_float_activation_paths_match_float64(bits, granularity, act):
    gen = torch.Generator().manual_seed(7)
    out_f, in_f, batch = 13, 37, 5
    packed, values, scale = random_packed(bits, out_f, in_f, granularity, gen, group_size=8)
    cfg = BitQuantConfig(weight_bits=bits, weight_granularity=granularity, group_size=8, activation_dtype=act)
    x = torch.randn(batch, in_f, generator=gen)
    bias = torch.randn(out_f, generator=gen)
    y = KERNEL.forward(x, KERNEL.prepare(packed, cfg), bias)
    xr = x.to(getattr(torch, act)).double()
    expected = xr @ dense_weight64(values, scale, granularity, 8).T + bias.double()
    assert y.dtype == x.dtype
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_group"])
@pytest.mark.parametrize("act_gran", ["per_tensor", "per_token"])
def test_int8_activation_path_matches_float64(bits, granularity, act_gran):
    gen = torch.Generator().manual_seed(11)
    out_f, in_f, batch = 9, 41, 4
    packed, values, scale = random_packed(bits, out_f, in_f, granularity, gen, group_size=16)
    cfg = BitQuantConfig(weight_bits=bits, weight_granularity=granularity, group_size=16,
                         activation_dtype="int8", activation_granularity=act_gran)
    x = torch.randn(batch, in_f, generator=gen)
    y = KERNEL.forward(x, KERNEL.prepare(packed, cfg))
    amax = x.abs().amax(dim=1, keepdim=True) if act_gran == "per_token" else x.abs().amax().expand(batch, 1)
    xq = torch.round(x * (127.0 / amax)).clamp(-127, 127).double() * (amax.double() / 127)
    expected = xq @ dense_weight64(values, scale, granularity, 16).T
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)


def test_binary_activation_path_is_xnor_math():
    gen = torch.Generator().manual_seed(3)
    packed, values, scale = random_packed(1, 6, 70, "per_channel", gen)
    cfg = BitQuantConfig(weight_bits=1, weight_granularity="per_channel", activation_dtype="binary",
                         activation_granularity="per_token")
    x = torch.randn(3, 70, generator=gen)
    y = KERNEL.forward(x, KERNEL.prepare(packed, cfg))
    signs = torch.where(x >= 0, 1.0, -1.0).double()
    # XNOR-popcount identity: dot(a, b) = K - 2 * popcount(a xor b) for a, b in {-1, +1}^K
    mismatches = (signs.unsqueeze(1) != values.double().unsqueeze(0)).sum(-1)
    expected = (70 - 2 * mismatches) * x.abs().mean(dim=1, keepdim=True).double() * scale.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_epilogues(activation):
    gen = torch.Generator().manual_seed(5)
    packed, values, scale = random_packed(1.58, 8, 16, "per_tensor", gen)
    cfg = BitQuantConfig(activation_dtype="float32")
    x = torch.randn(4, 16, generator=gen)
    bias = torch.randn(8, generator=gen)
    base = KERNEL.forward(x, KERNEL.prepare(packed, cfg), bias)
    y = KERNEL.forward(x, KERNEL.prepare(packed, cfg), bias, activation)
    expected = torch.relu(base) if activation == "relu" else torch.relu(base) ** 2
    torch.testing.assert_close(y, expected)


def test_batch_zero_and_noncontiguous_input():
    gen = torch.Generator().manual_seed(9)
    packed, _, _ = random_packed(1.58, 5, 12, "per_channel", gen)
    cfg = BitQuantConfig(activation_dtype="int8", activation_granularity="per_token")
    prepared = KERNEL.prepare(packed, cfg)
    assert KERNEL.forward(torch.randn(0, 12), prepared).shape == (0, 5)
    x = torch.randn(12, 6, generator=gen).T  # strided view
    torch.testing.assert_close(KERNEL.forward(x, prepared), KERNEL.forward(x.contiguous(), prepared))
