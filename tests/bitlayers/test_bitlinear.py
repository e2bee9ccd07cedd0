import io

import pytest
import torch
from torch import nn

from bitcore.config import BitQuantConfig
from bitcore.errors import CheckpointError, ConfigError
from bitlayers import BinaryActivation, BitLinear
from bitcore.quantize import fake_quantize_activation, fake_quantize_weight

CONFIGS = [
    BitQuantConfig(),
    BitQuantConfig(weight_bits=1, activation_dtype="binary", activation_granularity="per_token"),
    BitQuantConfig(weight_bits=2, weight_granularity="per_channel", activation_dtype="float32"),
    BitQuantConfig(weight_bits=4, weight_granularity="per_group", group_size=16, activation_dtype="int8",
                   activation_granularity="per_token"),
    BitQuantConfig(weight_bits=8, weight_granularity="per_channel", activation_dtype="bfloat16"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_eval_matches_train_fake_quant(cfg):
    torch.manual_seed(0)
    layer = BitLinear(37, 11, quant_config=cfg)
    x = torch.randn(4, 3, 37)
    layer.train()
    y_train = layer(x)
    layer.eval()
    y_eval = layer(x)
    assert layer.qweight.dtype == torch.uint8 and y_eval.shape == (4, 3, 11)
    torch.testing.assert_close(y_eval, y_train.detach(), rtol=2e-2 if cfg.activation_dtype == "bfloat16" else 1e-4,
                               atol=2e-2 if cfg.activation_dtype == "bfloat16" else 1e-4)


def test_gradients_follow_the_ste_definition():
    torch.manual_seed(1)
    cfg = BitQuantConfig(activation_dtype="int8", activation_granularity="per_token")
    layer = BitLinear(16, 8, quant_config=cfg)
    x = torch.randn(5, 16, requires_grad=True)
    layer(x).sum().backward()
    # STE: d/dW of sum(xq @ wq.T) is sum over tokens of xq (the identity passes it to the latent weight)
    xq = fake_quantize_activation(x.detach(), cfg)
    wq = fake_quantize_weight(layer.weight.detach(), cfg)
    torch.testing.assert_close(layer.weight.grad, xq.sum(0).expand(8, 16))
    torch.testing.assert_close(x.grad, wq.sum(0).expand(5, 16))
    torch.testing.assert_close(layer.bias.grad, torch.full((8,), 5.0))


def test_state_dict_round_trip_latent_and_packed():
    cfg = BitQuantConfig(weight_bits=1.58, weight_granularity="per_channel")
    src = BitLinear(20, 6, quant_config=cfg).eval()
    x = torch.randn(3, 20)
    dst = BitLinear(20, 6, quant_config=cfg)
    dst.load_state_dict(src.state_dict())
    dst.eval()
    assert torch.equal(dst(x), src(x))
    assert set(src.state_dict()) == {"weight", "bias", "qweight", "weight_scale"}


def test_state_dict_round_trip_frozen_into_fresh_layer():
    src = BitLinear(33, 7, quant_config=BitQuantConfig(weight_bits=2)).freeze()
    assert src.weight is None and src.frozen
    state = src.state_dict()
    assert "weight" not in state
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    dst = BitLinear(33, 7, quant_config=BitQuantConfig(weight_bits=2))
    dst.load_state_dict(torch.load(buf))
    assert dst.frozen
    x = torch.randn(2, 33)
    assert torch.equal(dst.eval()(x), src(x))


def test_frozen_layer_keeps_working_in_train_mode():
    layer = BitLinear(8, 4).freeze()
    x = torch.randn(2, 8)
    expected = layer(x)
    layer.train()
    assert torch.equal(layer(x), expected)


def test_mismatched_checkpoint_tensor_is_named():
    layer = BitLinear(16, 4).freeze()
    state = layer.state_dict()
    state["qweight"] = state["qweight"][:, :2]
    with pytest.raises(CheckpointError, match="qweight: shape"):
        BitLinear(16, 4).load_state_dict(state)
    state = layer.state_dict()
    del state["weight_scale"]
    with pytest.raises(CheckpointError, match="weight_scale: missing"):
        BitLinear(16, 4).load_state_dict(state)


def test_repacks_when_weight_changes_in_eval():
    layer = BitLinear(8, 4, quant_config=BitQuantConfig(activation_dtype="float32")).eval()
    x = torch.randn(3, 8)
    before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(-1)
    torch.testing.assert_close(layer(x), -before + 2 * layer.bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_moves_keep_scales_float32_and_output_dtype(dtype):
    layer = BitLinear(24, 5).eval()
    ref = layer(torch.randn(2, 24))
    layer = layer.to(dtype)
    assert layer.weight_scale.dtype == torch.float32
    x = torch.randn(2, 24).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert ref.shape == y.shape


def test_half_and_bfloat16_methods():
    layer = BitLinear(24, 5).eval()
    assert layer.half()(torch.randn(3, 24, dtype=torch.float16)).dtype == torch.float16
    assert layer.bfloat16()(torch.randn(3, 24, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_wrong_in_features_is_named():
    with pytest.raises(ValueError, match=r"in_features=16, got shape \(2, 15\)"):
        BitLinear(16, 4)(torch.randn(2, 15))


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="floating-point input.*torch.int64"):
        BitLinear(4, 2)(torch.ones(2, 4, dtype=torch.long))


def test_input_on_other_device_is_named():
    layer = BitLinear(4, 2)
    with pytest.raises(RuntimeError, match="input is on meta but the layer's weights are on cpu"):
        layer(torch.empty(2, 4, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cpu_input_on_cuda_layer_is_named():
    layer = BitLinear(4, 2).cuda().eval()
    with pytest.raises(RuntimeError, match="input is on cpu but the layer's weights are on cuda"):
        layer(torch.randn(2, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_move_keeps_outputs():
    layer = BitLinear(40, 9).eval()
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), layer.cpu()(x), rtol=1e-4, atol=1e-4)


def test_unknown_bits_and_bad_config_type():
    with pytest.raises(ConfigError, match="weight_bits"):
        BitLinear(4, 2, quant_config={"weight_bits": 3})
    with pytest.raises(TypeError, match="quant_config"):
        BitLinear(4, 2, quant_config="ternary")


def test_extra_repr_shows_bits_granularity_and_kernel():
    text = repr(BitLinear(8, 4, quant_config=BitQuantConfig(weight_granularity="per_channel")))
    assert "W1.58A8 per_channel/per_tensor" in text and "storage_bits=2" in text and "kernel=" in text


def test_true_weight_memory_for_ternary_is_two_bits():
    layer = BitLinear(1000, 1000).eval()
    assert layer.weight_memory_bytes() == 1000 * 250 + 4


def test_fused_activation_epilogue():
    layer = BitLinear(8, 6, fused_activation="relu2").eval()
    plain = BitLinear(8, 6)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), torch.relu(plain.eval()(x)) ** 2)


def test_forced_backend_on_layer():
    layer = BitLinear(8, 4, backend="torch_ref").eval()
    assert layer.kernel().backend == "torch_ref"


def test_binary_activation_module():
    act = BinaryActivation()
    assert act(torch.tensor([-0.3, 0.0, 2.0])).tolist() == [-1.0, 1.0, 1.0]
    with pytest.raises(TypeError):
        act(torch.tensor([1, 2]))


def test_drop_in_for_linear_in_sequential():
    model = nn.Sequential(BitLinear(10, 7), nn.ReLU(), BitLinear(7, 3))
    out = model(torch.randn(5, 10))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
