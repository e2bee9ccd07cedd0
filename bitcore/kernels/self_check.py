"""The default kernel self-check: tiny random problems compared with the reference backend.

The registry runs a kernel's ``self_check`` once, lazily, the first time the
kernel would be chosen; a kernel that fails is rejected (``explain`` and
``bitlab info`` say why) and the next candidate serves instead.  The default
check covers one key per (weight bits, activation dtype) the kernel serves, on
one device it supports that exists here, at a 3x67 -> 13 problem with bias:
cheap (milliseconds per key) and enough to catch a miscompiled extension, a
wrong layout or a broken SIMD path.  Tolerances are loose on purpose (0.1% of
the output's scale): the conformance suite does the exact comparison.

Example::

    failure = reference_self_check(kernel)   # None when the kernel agrees
"""
from __future__ import annotations

from typing import Optional

import torch

from bitcore.kernels.interface import BitKernel, KernelKey

SHAPES = ((67, 13), (256, 64), (1024, 128))  # (in_features, out_features): the first the kernel accepts
TOKENS = 3
RELATIVE_TOLERANCE = 1e-3


def _device_for(kernel: BitKernel) -> Optional[str]:
    if "cpu" in kernel.devices:
        return "cpu"
    if "cuda" in kernel.devices and torch.cuda.is_available():
        return "cuda"
    return None


def _one_key_per_family(keys) -> list:
    chosen = {}
    for key in sorted(keys):
        chosen.setdefault((key.weight_bits, key.activation_dtype), key)
    return list(chosen.values())


def _check_key(kernel: BitKernel, key: KernelKey, device: str, gen: torch.Generator) -> Optional[str]:
    from backends.torch_ref.kernels import TorchReferenceKernel
    from bitcore.kernels.registry import config_for_key
    from bitcore.packing import pack_weight
    from bitcore.quantize import quantize_weight

    shape = next((s for s in SHAPES if kernel.check_shape(*s) is None), None)
    if shape is None:
        return None
    in_f, out_f = shape
    cfg = config_for_key(key)
    values, scale = quantize_weight(torch.randn(out_f, in_f, generator=gen), cfg)
    group = cfg.group_size if cfg.weight_granularity == "per_group" else None
    packed = pack_weight(values.to(device), scale.to(device), cfg.weight_bits, cfg.weight_granularity, group)
    x = torch.randn(TOKENS, in_f, generator=gen).to(device)
    bias = torch.randn(out_f, generator=gen).to(device)
    reference = TorchReferenceKernel()
    want = reference.forward(x, reference.prepare(packed, cfg), bias).float()
    got = kernel.forward(x, kernel.prepare(packed, cfg), bias)
    if tuple(got.shape) != (TOKENS, out_f) or got.dtype != x.dtype:
        return f"{key} on {device}: output {tuple(got.shape)} {got.dtype}, expected {(TOKENS, out_f)} {x.dtype}"
    got = got.float()
    if not bool(torch.isfinite(got).all()):
        return f"{key} on {device}: NaN/Inf in the output of a {in_f}x{out_f} problem"
    err = float((got - want).abs().max())
    allowed = RELATIVE_TOLERANCE * float(want.abs().max()) + 1e-6
    if err > allowed:
        return f"{key} on {device}: max |error| {err:.3g} against torch_ref on a {out_f}x{in_f} problem (allowed {allowed:.3g})"
    return None


def reference_self_check(kernel: BitKernel) -> Optional[str]:
    """None when ``kernel`` agrees with the reference on one tiny problem per key family, else the first failure."""
    device = _device_for(kernel)
    if device is None:
        return None
    gen = torch.Generator().manual_seed(20240229)
    for key in _one_key_per_family(kernel.keys):
        failure = _check_key(kernel, key, device, gen)
        if failure:
            return failure
    return None
