"""Every available kernel, on every key it declares and every device here, computes the reference function.

Cases are discovered through ``KernelRegistry`` (see conftest.py); problems are
drawn by hypothesis (problems.py); the bounds are in tolerance.py.  The
reference backend itself is held to the float64 oracle; every other backend
to the reference.
"""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from backends.torch_ref.kernels import TorchReferenceKernel
from bitcore.kernels import KernelRegistry

from .problems import Problem, packed_to, problems
from .tolerance import U32, expected_output, mismatch_report, probe_output

REFERENCE = TorchReferenceKernel()


def on_device(p: Problem, device: str) -> Problem:
    if device == "cpu":
        return p
    packed = packed_to(p.packed, device)
    x = p.x.to(device)  # .to keeps neither the strides nor the offset: rebuild the layout there
    if not p.x.is_contiguous():
        x = torch.empty_strided(p.x.shape, p.x.stride(), dtype=p.x.dtype, device=device).copy_(p.x)
    bias = None if p.bias is None else p.bias.to(device)
    return Problem(p.config, x, packed, bias, p.activation, p.probe, p.layout)


def check_refusal(case, p: Problem, reason: str) -> None:
    """A kernel that refuses a shape must never be chosen for it, and explain must say why."""
    exp = KernelRegistry.explain(p.config, case.device, backend=case.kernel.backend,
                                 in_features=p.packed.in_features, out_features=p.packed.out_features)
    mine = [c for c in exp.candidates if c.kernel == case.kernel.name]
    assert mine and mine[0].status == "rejected" and reason in mine[0].reason, str(exp)


@given(data=st.data())
def test_kernel_matches_reference(case, data, case_counter, max_weight_elements):
    kernel, device = case.kernel, case.device
    limit = min(max_weight_elements, getattr(kernel, "conformance_max_weight_elements", max_weight_elements))
    p = on_device(data.draw(problems(case.key, limit)), device)
    tally = (kernel.backend, device)
    refusal = kernel.check_shape(p.packed.in_features, p.packed.out_features)
    if refusal:
        check_refusal(case, p, refusal)
        case_counter[tally + ("shape refused",)] += 1
        return

    x_before = p.x.clone()
    y = kernel.forward(p.x, kernel.prepare(p.packed, p.config), p.bias, p.activation)
    where = f"{kernel.name} on {p.describe()}"
    assert isinstance(y, torch.Tensor), f"{where}: forward returned {type(y).__name__}"
    assert y.shape == (p.x.shape[0], p.packed.out_features), f"{where}: output shape {tuple(y.shape)}"
    assert y.dtype == p.x.dtype, f"{where}: output dtype {y.dtype}, expected the input's {p.x.dtype}"
    assert y.device == p.x.device, f"{where}: output on {y.device}, input on {p.x.device}"
    assert torch.equal(p.x, x_before), f"{where}: the kernel modified its input"

    is_reference = isinstance(kernel, TorchReferenceKernel) and type(kernel).forward is TorchReferenceKernel.forward
    if p.probe:
        want = probe_output(p.x, p.packed, p.config, p.bias, p.activation)
        if not is_reference:
            ref = REFERENCE.forward(p.x, REFERENCE.prepare(p.packed, p.config), p.bias, p.activation)
            assert torch.equal(ref, want), f"reference disagrees with the exact probe on {p.describe()}"
        if p.config.activation_dtype == "binary":  # exact up to the 1-ulp freedom of the scale (problems.py)
            report = mismatch_report(y.cpu(), want.cpu().double(), 8 * U32 * want.cpu().double().abs() + 1e-30)
            assert not report, f"{where}: {report}"
        else:
            assert torch.isfinite(y).all(), f"{where}: NaN/Inf in the output"
            bad = (y != want).sum().item()
            assert bad == 0, f"{where}: {bad} element(s) differ from the exact integer result {want.flatten()[:4]} vs {y.flatten()[:4]}"
        case_counter[tally + ("exact",)] += 1
        return

    expected = expected_output(p.x.cpu(), packed_to(p.packed, "cpu"), p.config,
                               None if p.bias is None else p.bias.cpu(), p.activation)
    if is_reference:
        report = mismatch_report(y.cpu(), expected.value, expected.tolerance)
    else:
        ref = REFERENCE.forward(p.x, REFERENCE.prepare(p.packed, p.config), p.bias, p.activation)
        assert not mismatch_report(ref.cpu(), expected.value, expected.tolerance), "the reference left its bound"
        report = mismatch_report(y.cpu(), ref.cpu().double(), 2 * expected.tolerance)
    assert not report, f"{where}: {report}"
    case_counter[tally + ("within tolerance",)] += 1

