"""The conformance oracle and the tolerances every backend is held to.

A kernel's output for a problem is compared with the reference backend
(``torch_ref``); the reference itself is compared with float64 math computed
here from the quantizers' definitions.  The bounds below are the guarantees
written in ``docs/reliability.md``:

* integer activations (int8, binary) under the *exactness probe* (every weight
  scale 1.0, every activation scale 1.0, see ``backends/torch_ref/kernels.py``):
  bit-for-bit equal to the reference;
* integer activations otherwise: the integer accumulation is exact, only the
  float32 scale products and the sum over weight groups round, so
  ``|y - y*| <= (n_groups + 8) * u32 * sum_g |acc_g| * w_scale_g * x_scale``;
  binary activations add ``(2 sqrt(n) + 8) * u32`` relative for their scale,
  a float32 mean of ``n`` values whose rounding depends on the summation order;
* float activations: float32 accumulation in any order,
  ``|y - y*| <= (8 * sqrt(K) + 8) * u32 * (|x| @ |W|^T)``;

then ``+ 4 u32 |y|`` for the bias add, the squared-ReLU propagation
``tol * (2|y| + tol)``, and ``4 u_out |y|`` for the final cast to the output
dtype (``u`` is the unit roundoff: 2^-24 float32, 2^-11 float16, 2^-8
bfloat16).  A kernel is compared with the reference at twice the bound (both
sit within the bound of the float64 value).  NaN or Inf never passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from backends.torch_ref.kernels import FLOAT_DTYPES, apply_epilogue, integer_accumulate
from bitcore.config import BitQuantConfig
from bitcore.packing import PackedWeight, expand_scale, unpack_values
from bitcore.quantize import quantize_activation_binary, quantize_activation_int8

U32 = 2.0**-24
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


@dataclass
class Expected:
    value: torch.Tensor  # float64 [tokens, out]
    tolerance: torch.Tensor  # float64 [tokens, out], elementwise bound on |y - value|


def _linear_part(x: torch.Tensor, packed: PackedWeight, cfg: BitQuantConfig):
    """(float64 value, float64 bound) of the product before bias and epilogue."""
    k = packed.in_features
    if cfg.float_activations:
        xa = x.to(FLOAT_DTYPES[cfg.activation_dtype]).double()
        w = unpack_values(packed).double() * expand_scale(packed).double()
        value = xa @ w.T
        magnitude = xa.abs() @ w.abs().T
        return value, (8 * math.sqrt(k) + 8) * U32 * magnitude
    quantize = quantize_activation_int8 if cfg.activation_dtype == "int8" else quantize_activation_binary
    xq, x_scale = quantize(x, cfg.activation_granularity)
    values = unpack_values(packed)
    x_scale = x_scale.double()
    # int8's scale is a max (exact anywhere); binary's is a float32 mean, whose rounding depends on the
    # summation order of the device / kernel: allow a realistic bound for it on top.
    if cfg.activation_dtype == "binary":
        n = x.numel() if cfg.activation_granularity == "per_tensor" else x.shape[1]
        scale_slack = (2 * math.sqrt(max(n, 1)) + 8) * U32
    else:
        scale_slack = 0.0
    if packed.granularity == "per_group":
        acc = integer_accumulate(xq, values, packed.group_size)  # [tokens, out, groups], exact
        scale = packed.scale.double().unsqueeze(0)
        value = (acc * scale).sum(dim=-1) * x_scale
        magnitude = (acc.abs() * scale).sum(dim=-1) * x_scale
        n_groups = acc.shape[-1]
    else:
        acc = integer_accumulate(xq, values)
        scale = packed.scale.double().view(1, -1)
        value = acc * scale * x_scale
        magnitude = value.abs()
        n_groups = 1
    return value, ((n_groups + 8) * U32 + scale_slack) * magnitude


def expected_output(
    x: torch.Tensor,
    packed: PackedWeight,
    cfg: BitQuantConfig,
    bias: Optional[torch.Tensor],
    activation: str,
) -> Expected:
    """float64 value of the kernel contract for this problem and the bound any conforming kernel meets."""
    y, tol = _linear_part(x, packed, cfg)
    if bias is not None:
        y = y + bias.double()
    tol = tol + 4 * U32 * y.abs()
    if activation in ("relu", "relu2"):
        pre = y
        y = torch.relu(pre)
        if activation == "relu2":
            tol = tol * (2 * pre.abs() + tol) + 4 * U32 * y.square()
            y = y.square()
    u_out = UNIT_ROUNDOFF[x.dtype]
    finfo = torch.finfo(x.dtype)
    tol = tol + 4 * u_out * (y.abs() + tol) + 2 * finfo.tiny * finfo.eps
    return Expected(y, tol)


def mismatch_report(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> str:
    """'' when every element is finite and within bound; else a description of the worst element."""
    a = actual.double()
    if not bool(torch.isfinite(a).all()):
        bad = int((~torch.isfinite(a)).sum())
        return f"{bad} NaN/Inf value(s) in the output (NaN and Inf never pass)"
    if not bool(torch.isfinite(expected).all()):
        return "the expected value itself is not finite: the problem generator is wrong"
    err = (a - expected).abs()
    over = err > bound
    if not bool(over.any()):
        return ""
    ratio = torch.where(over, err / bound.clamp_min(1e-300), torch.zeros_like(err))
    idx = int(ratio.flatten().argmax())
    r, c = divmod(idx, a.shape[1])
    return (
        f"{int(over.sum())} of {a.numel()} elements out of tolerance; worst at [{r}, {c}]: "
        f"got {a[r, c].item():.9g}, expected {expected[r, c].item():.9g}, "
        f"|error| {err[r, c].item():.3g} > bound {bound[r, c].item():.3g}"
    )


def probe_output(x: torch.Tensor, packed: PackedWeight, cfg: BitQuantConfig, bias, activation: str) -> torch.Tensor:
    """The bit-exact output under the exactness probe: exact integer sums, then float32 epilogue, then the cast."""
    quantize = quantize_activation_int8 if cfg.activation_dtype == "int8" else quantize_activation_binary
    xq, x_scale = quantize(x, cfg.activation_granularity)
    values = unpack_values(packed)
    assert bool((packed.scale == 1).all()), "not an exactness-probe problem: a weight scale is not 1"
    assert bool(((x_scale - 1).abs() <= 2 * U32).all()), "not an exactness-probe problem: an activation scale is not 1"
    acc = integer_accumulate(xq, values)
    assert acc.numel() == 0 or float(acc.abs().max()) < 2**24, "probe sums must stay exact in float32"
    y = acc.to(torch.float32)
    if cfg.activation_dtype == "binary":  # mean|x| of +-1 values: 1, or 1 - 2^-24 where the mean multiplies by 1/n
        y = y * x_scale
    y = apply_epilogue(y, None if bias is None else bias.float(), activation)
    return y.to(x.dtype)
