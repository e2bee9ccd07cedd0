"""Projection inputs that the projection's kernel normalizes itself.

A decoder runs an RMSNorm before each projection, often after a residual add or a gated
activation.  :class:`NormedInput` describes such an input without computing it, so a kernel
that implements :meth:`BitKernel.forward_normed` can do the norm (and the int8 quantization
of a W*A8 key) inside its own launch instead of paying a separate kernel.  The modes:

* ``"norm"``: ``x = rms_norm(a)``
* ``"add_norm"``: ``h = a + b``, ``x = rms_norm(h)``; ``h`` (the residual stream) is returned too
* ``"relu2_gate_norm"``: ``x = rms_norm(relu(a)**2 * b)`` (BitNet's squared-ReLU gated MLP)

:func:`normed_rows` is the definition (transformers' BitNetRMSNorm: normalize in float32, cast
back, then scale), which kernels are tested against.

Example::

    n = NormedInput(h, delta, norm.weight, 1e-5, "add_norm")
    x, h_new = normed_rows(n)
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

NORM_MODES = {"norm": 0, "add_norm": 1, "relu2_gate_norm": 2}


class NormedInput(NamedTuple):
    """``rms_norm`` of ``a`` (mode ``"norm"``), of ``a + b`` or of ``relu(a)**2 * b``: ``a, b [..., K]``,
    ``weight [K]`` the norm's scale, ``eps`` its epsilon, ``mode`` a key of :data:`NORM_MODES`."""

    a: torch.Tensor
    b: Optional[torch.Tensor]
    weight: torch.Tensor
    eps: float
    mode: str


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' BitNetRMSNorm: normalize in float32, cast to x.dtype, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def normed_rows(n: NormedInput) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(x, h)``: the normalized input and, in mode ``"add_norm"``, the sum ``h = a + b`` (else None)."""
    check_normed_input(n)
    if n.mode == "add_norm":
        h = n.a + n.b
        return rms_norm(h, n.weight, n.eps), h
    source = torch.relu(n.a).square() * n.b if n.mode == "relu2_gate_norm" else n.a
    return rms_norm(source, n.weight, n.eps), None


def check_normed_input(n: NormedInput, in_features: Optional[int] = None) -> None:
    """ValueError naming what is wrong with ``n`` (mode, shapes, dtypes, devices)."""
    if n.mode not in NORM_MODES:
        raise ValueError(f"mode: got {n.mode!r}; allowed values are {list(NORM_MODES)}")
    k = n.a.shape[-1]
    if in_features is not None and k != in_features:
        raise ValueError(f"normed input has {k} features, expected in_features={in_features}")
    if n.weight.dim() != 1 or n.weight.numel() != k or n.weight.device != n.a.device:
        raise ValueError(f"norm weight must be [{k}] on {n.a.device}; got {tuple(n.weight.shape)} on {n.weight.device}")
    if n.mode == "norm":
        if n.b is not None:
            raise ValueError("mode 'norm' takes no b")
        return
    if n.b is None or n.b.shape != n.a.shape or n.b.dtype != n.a.dtype or n.b.device != n.a.device:
        got = "None" if n.b is None else f"{n.b.dtype} {tuple(n.b.shape)} on {n.b.device}"
        raise ValueError(f"mode {n.mode!r} needs b like a ({n.a.dtype} {tuple(n.a.shape)} on {n.a.device}); got {got}")
