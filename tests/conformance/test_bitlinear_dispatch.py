"""The same conformance through the layer: BitLinear forced to each backend against BitLinear on the reference.

This covers what the kernel-level test does not: the dispatch op, the
per-layer prepared cache, 3-D and strided inputs reshaped by the layer, and
module dtype moves (``.half()``, ``.bfloat16()``) that change the bias dtype.
"""
from __future__ import annotations

import copy

import torch
from hypothesis import given
from hypothesis import strategies as st

from bitlayers import BitLinear

from .problems import LAYER_DTYPES, config_from_key, features, layout_as, packed_to
from .tolerance import expected_output, mismatch_report


@given(data=st.data())
def test_bitlinear_forced_to_backend_matches_reference_layer(backend_case, data, case_counter, max_weight_elements):
    kernel, device = backend_case.kernel, backend_case.device
    key = data.draw(st.sampled_from(sorted(kernel.keys)), label="key")
    in_f = data.draw(features, label="in_features")
    out_f = max(1, min(data.draw(features, label="out_features"), max_weight_elements // in_f))
    if kernel.check_shape(in_f, out_f):
        case_counter[(kernel.backend, device, "layer: shape refused")] += 1
        return
    lead = data.draw(st.tuples(st.integers(1, 3), st.integers(0, 9)), label="leading dims")
    dtype = data.draw(st.sampled_from(LAYER_DTYPES), label="dtype")
    activation = data.draw(st.sampled_from(sorted(kernel.epilogues)), label="epilogue")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    cfg = config_from_key(key, data.draw(st.sampled_from([32, 64, 128]), label="group_size"))

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    reference = BitLinear(in_f, out_f, quant_config=cfg, fused_activation=activation, backend="torch_ref")
    reference = reference.to(device=device, dtype=dtype).eval()
    layer = copy.deepcopy(reference)
    layer.backend = kernel.backend
    flat = layout_as(torch.randn(lead[0] * lead[1], in_f, generator=gen).to(dtype), "transposed", gen)
    x = flat.to(device).reshape(*lead, in_f) if lead[1] else torch.empty(*lead, in_f, dtype=dtype, device=device)

    with torch.no_grad():
        y = layer(x)
        want = reference(x)
    where = f"{kernel.backend} BitLinear {in_f}->{out_f} {cfg.describe()} x{tuple(x.shape)} {dtype} {activation}"
    assert y.shape == (*lead, out_f) and y.dtype == dtype, f"{where}: got {tuple(y.shape)} {y.dtype}"
    assert layer.kernel(device).backend == kernel.backend
    bound = expected_output(x.reshape(-1, in_f).cpu(), packed_to(layer.packed_weight(), "cpu"), cfg,
                            None if layer.bias is None else layer.bias.cpu(), activation)
    report = mismatch_report(y.reshape(-1, out_f).cpu(), want.reshape(-1, out_f).cpu().double(), 2 * bound.tolerance)
    assert not report, f"{where}: {report}"
    case_counter[(kernel.backend, device, "layer: within tolerance")] += 1

