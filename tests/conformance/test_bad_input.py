"""Bad input is refused with an error that names the problem, on every backend.

Layer-level checks run with each available backend forced (they must fail
before any kernel runs); kernel-level checks call each kernel directly with
an input of the wrong width, which must raise rather than read out of bounds.
"""
from __future__ import annotations

import re

import pytest
import torch

from bitcore.config import BitQuantConfig
from bitcore.errors import BackendUnavailableError, CheckpointError, ConfigError, NoKernelError, QuantizationError
from bitcore.kernels import ALL_KEYS, KernelRegistry, config_for_key
from bitcore.packing import pack_weight
from bitcore.quantize import quantize_weight
from bitlayers import BitLinear

from .conftest import devices_here


def _served_config(kernel, device):
    key = sorted(kernel.keys)[len(kernel.keys) // 2]
    return config_for_key(key)


def _layer_for(backend_case) -> BitLinear:
    cfg = _served_config(backend_case.kernel, backend_case.device)
    layer = BitLinear(21, 6, quant_config=cfg, backend=backend_case.kernel.backend)
    return layer.to(backend_case.device).eval()


def test_wrong_in_features_is_named(backend_case):
    layer = _layer_for(backend_case)
    x = torch.randn(3, 22, device=backend_case.device)
    with pytest.raises(ValueError, match=r"in_features=21.*\(3, 22\)"):
        layer(x)


def test_kernel_given_the_wrong_width_raises_instead_of_reading_out_of_bounds(backend_case):
    kernel, device = backend_case.kernel, backend_case.device
    cfg = _served_config(kernel, device)
    values, scale = quantize_weight(torch.randn(6, 21), cfg)
    group = cfg.group_size if cfg.weight_granularity == "per_group" else None
    packed = pack_weight(values.to(device), scale.to(device), cfg.weight_bits, cfg.weight_granularity, group)
    prepared = kernel.prepare(packed, cfg)
    for width in (20, 29):
        with pytest.raises(Exception) as info:
            kernel.forward(torch.randn(3, width, device=device), prepared)
        message = str(info.value)
        assert re.search(r"(?<!\d)21(?!\d)", message) and re.search(rf"(?<!\d){width}(?!\d)", message), (
            f"{kernel.name}: the error for width {width} (expected 21) does not name both: {message!r}"
        )


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64])
def test_non_float_input_dtype_is_named(backend_case, dtype):
    layer = _layer_for(backend_case)
    x = torch.ones(2, 21, device=backend_case.device).to(dtype)
    with pytest.raises(TypeError, match=re.escape(str(dtype))):
        layer(x)


def test_input_on_another_device_is_named():
    # No GPU needed: the meta device is a real second device type as far as placement checks go.
    layer = BitLinear(16, 4).eval()
    with pytest.raises(RuntimeError, match=r"input is on meta but the layer's weights are on cpu"):
        layer(torch.randn(2, 16, device="meta"))


@pytest.mark.gpu
def test_cpu_input_on_a_cuda_layer_is_named(cuda_device):
    layer = BitLinear(16, 4).to(cuda_device).eval()
    with pytest.raises(RuntimeError, match=r"input is on cpu but the layer's weights are on cuda"):
        layer(torch.randn(2, 16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("when", ["eval", "train_forward", "freeze"])
def test_non_finite_weight_is_refused_at_quantization(bad, when):
    layer = BitLinear(12, 5)
    with torch.no_grad():
        layer.weight[3, 7] = bad
    with pytest.raises(QuantizationError, match=r"1 NaN/Inf value"):
        if when == "eval":
            layer.eval()
        elif when == "freeze":
            layer.freeze()
        else:
            layer(torch.randn(2, 12))


def test_key_a_forced_backend_does_not_serve_is_named(backend_case):
    kernel, device = backend_case.kernel, backend_case.device
    served = {k for kern in KernelRegistry.kernels() if kern.backend == kernel.backend and device in kern.devices
              for k in kern.keys}
    unserved = sorted(ALL_KEYS - served)
    if not unserved:
        pytest.skip(f"{kernel.backend} serves every key on {device}: nothing to refuse")
    key = unserved[0]
    layer = BitLinear(21, 6, quant_config=config_for_key(key), backend=kernel.backend).to(device).eval()
    with pytest.raises(NoKernelError) as info:
        layer(torch.randn(2, 21, device=device))
    message = str(info.value)
    assert str(key) in message and f"backend forced to {kernel.backend!r}" in message


def test_unknown_forced_backend_lists_the_registered_ones():
    layer = BitLinear(8, 3, backend="no_such_backend").eval()
    with pytest.raises(BackendUnavailableError, match=r"unknown backend 'no_such_backend'; registered backends: \[.*torch_ref"):
        layer(torch.randn(1, 8))


def _checkpoint(cfg=BitQuantConfig(weight_bits=1.58)):
    layer = BitLinear(19, 6, quant_config=cfg).freeze()
    return layer.state_dict(), cfg


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda sd: sd.update(qweight=sd["qweight"][:, :-1]), r"qweight: shape \(6, 4\) does not match the layer, expected \(6, 5\)"),
        (lambda sd: sd.update(qweight=sd["qweight"][:-2]), r"qweight: shape \(4, 5\) does not match the layer, expected \(6, 5\)"),
        (lambda sd: sd.update(qweight=sd["qweight"].to(torch.int8)), r"qweight: dtype torch.int8 does not match the layer, expected torch.uint8"),
        (lambda sd: sd.update(weight_scale=torch.ones(6)), r"weight_scale: shape \(6,\) does not match the layer, expected \(1,\)"),
        (lambda sd: sd.pop("weight_scale"), r"weight_scale: missing from the checkpoint"),
        (lambda sd: sd["qweight"].view(-1).__setitem__(4, 0xFF), r"qweight: 1 byte\(s\) hold the ternary code 3"),
        (lambda sd: sd["weight_scale"].fill_(float("nan")), r"weight_scale: 1 NaN/Inf scale value"),
    ],
    ids=["truncated_columns", "truncated_rows", "wrong_dtype", "wrong_scale_shape", "missing_scale", "invalid_code", "nan_scale"],
)
def test_corrupted_packed_checkpoint_is_refused_with_the_key_named(corrupt, message):
    state, cfg = _checkpoint()
    state = {k: v.clone() for k, v in state.items()}
    corrupt(state)
    fresh = BitLinear(19, 6, quant_config=cfg)
    with pytest.raises(CheckpointError, match=message):
        fresh.load_state_dict(state)


def test_truncated_checkpoint_file_fails_to_load(tmp_path):
    state, _ = _checkpoint()
    path = tmp_path / "layer.pt"
    torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match=r"(?i)(zip|archive|central directory|truncat|EOF|failed finding)"):
        torch.load(path, weights_only=True)


@pytest.mark.parametrize("field", ["weight_bitz", "granularity"])
def test_config_file_with_an_unknown_field_names_it_and_the_known_ones(tmp_path, field):
    path = tmp_path / "quant.yaml"
    path.write_text(f"weight_bits: 1.58\n{field}: per_channel\n")
    with pytest.raises(ConfigError, match=rf"unknown field\(s\) \['{field}'\]; known fields are \[.*'weight_bits'"):
        BitQuantConfig.from_yaml(path)


def test_model_config_file_with_an_unknown_field_names_it(tmp_path):
    from bitmodels.configs import load_model_config

    path = tmp_path / "model.yaml"
    path.write_text("model_type: bit_mlp\nhiden_sizes: [32]\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['hiden_sizes'\]"):
        load_model_config(path)
