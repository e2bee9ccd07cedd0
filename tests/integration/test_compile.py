"""torch.compile of models with BitLinear layers: one graph, eager results, dispatch still at run time."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

from backends.torch_ref.kernels import TorchReferenceKernel
from bitcore.hookspecs import BackendSpec
from bitcore.kernels import KernelRegistry
from bitlayers import BitLinear

from .models import CONFIGS, bit_mlp


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_dynamo_sees_one_graph_with_every_bitlinear_as_one_op():
    m = bit_mlp()
    x = torch.randn(3, 37)
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    ops = [n.target for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    bitlinear = (torch.ops.bitlab.bitlinear, torch.ops.bitlab.bitlinear.default)
    assert sum(op in bitlinear for op in ops) == len(CONFIGS)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_fullgraph_matches_eager_on_3d_and_odd_batches(backend):
    m = bit_mlp()
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    with torch.no_grad():
        for shape in [(2, 3, 37), (1, 37), (7, 37)]:
            x = torch.randn(shape)
            assert torch.equal(compiled(x), m(x)), f"{backend}: compiled differs from eager at {shape}"


class _CountingKernel(TorchReferenceKernel):
    backend = "counting"
    priority = -50  # never chosen unless forced
    calls = 0

    def forward(self, x, prepared, bias=None, activation="none"):
        type(self).calls += 1
        return super().forward(x, prepared, bias, activation)


def test_forcing_a_backend_reaches_inside_a_compiled_model():
    KernelRegistry.register_backend(BackendSpec(name="counting", kernels=[_CountingKernel()]))
    try:
        m = bit_mlp()
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        x = torch.randn(4, 37)
        with torch.no_grad():
            compiled(x)
            assert _CountingKernel.calls == 0
            with KernelRegistry.force_backend("counting"):
                y = compiled(x)
            assert _CountingKernel.calls == len(CONFIGS), "force_backend did not reach the compiled model"
            with KernelRegistry.force_backend("torch_ref"):
                assert torch.equal(y, m(x))
    finally:
        KernelRegistry.unregister("counting")


def test_compiling_a_layer_that_was_never_packed_says_what_to_do():
    layer = BitLinear(16, 8)
    layer.training = False  # eval flag without eval(): nothing packed yet
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"call layer.eval\(\)"):
        compiled(torch.randn(2, 16))


def test_changed_packed_weights_are_prepared_again_not_served_stale():
    layer = BitLinear(24, 10).eval()
    x = torch.randn(3, 24)
    with torch.no_grad():
        before = layer(x)
        other = BitLinear(24, 10).eval()
        layer.qweight.copy_(other.qweight)  # in place: same tensor, new version
        layer.weight_scale.copy_(other.weight_scale)
        layer.bias.copy_(other.bias)
        after = layer(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, other(x).detach())


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe())
def test_eval_mode_gradients_are_the_training_straight_through_gradients(cfg):
    torch.manual_seed(1)
    layer = BitLinear(33, 11, quant_config=cfg, fused_activation="relu2")
    x = torch.randn(5, 33) * 0.7
    grads = {}
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        with KernelRegistry.force_backend("torch_ref"):
            layer(xi).sum().backward()
        grads[mode] = (xi.grad, layer.bias.grad.clone())
    # bfloat16 activations round x in eval; training keeps float32: the gradients agree to bf16 precision
    tol = 2e-2 if cfg.activation_dtype == "bfloat16" else 1e-4
    for a, b in zip(grads["eval"], grads["train"]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
