"""BitLinear under torch.inference_mode, autocast, copies and pickling."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from bitlayers import BitLinear

from .models import bit_mlp


def test_inference_mode_gives_the_no_grad_result():
    m = bit_mlp()
    x = torch.randn(6, 37)
    with torch.no_grad():
        expected = m(x)
    with torch.inference_mode():
        y = m(x)
    assert y.is_inference() and torch.equal(y, expected)


def test_layer_packed_inside_inference_mode_works_outside_it_with_gradients():
    layer = BitLinear(40, 9)
    x = torch.randn(3, 40)
    with torch.inference_mode():
        layer.eval()  # packs: qweight / weight_scale are inference tensors now
        inside = layer(x)
    assert layer.qweight.is_inference()
    xg = x.clone().requires_grad_(True)
    outside = layer(xg)
    outside.sum().backward()
    assert torch.equal(outside.detach(), inside)
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_eval_equals_feeding_the_autocast_dtype_explicitly(dtype):
    m = bit_mlp()
    x = torch.randn(4, 37)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=dtype):
            y = m(x)
        # what autocast does around the BitLinear layers: nn.Linear runs in `dtype`, BitLinear keeps its input dtype
        h = torch.nn.functional.linear(x.to(dtype), m[0].weight.to(dtype), m[0].bias.to(dtype))
        for layer in list(m)[1:-1]:
            h = layer(h)
        last = m[-1]
        expected = torch.nn.functional.linear(h, last.weight.to(dtype), last.bias.to(dtype))
    assert y.dtype == dtype
    assert torch.isfinite(y.float()).all()
    assert torch.equal(y, expected)


def test_autocast_training_forward_and_backward():
    m = bit_mlp().train()
    x = torch.randn(4, 37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m[1].weight.grad.abs().sum() > 0


def test_deepcopy_and_torch_save_give_independent_working_layers():
    m = bit_mlp()
    x = torch.randn(2, 37)
    with torch.no_grad():
        y = m(x)
        twin = copy.deepcopy(m)
        assert twin[1]._prepared.id != m[1]._prepared.id  # no shared prepared-weight cache
        assert torch.equal(twin(x), y)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded(x), y)


def test_float64_model_runs_its_packed_layers_through_float32():
    m = bit_mlp()
    x = torch.randn(3, 37, dtype=torch.float64)
    with torch.no_grad():
        y = m.double()(x)
        layer = m[1]
        h = m[0](x)
        expected = layer(h.float()).double()  # the contract: float32 in, float32 math
        assert torch.equal(layer(h), expected)
    assert y.dtype == torch.float64 and torch.isfinite(y).all()
