"""Quantizers and their straight-through estimators (STE).

These functions *define* BitLab's quantized math; every backend computes the
same function on their outputs.

Weights (``w`` is ``[out, in]``; a "granule" is the whole tensor, a row, or a
group of ``group_size`` consecutive inputs of a row, per the config):

* ternary (1.58, BitNet b1.58 absmean): ``s = max(mean|w|, eps)``,
  ``q = clamp(round(w / s), -1, 1)``
* binary (1, XNOR-Net): ``s = mean|w|``, ``q = +1 if w >= 0 else -1``
* int2: ``s = 0.624 * max(mean|w|, eps)``, ``q`` = nearest of {-3, -1, +1, +3} to ``w / s``.
  The grid has no zero, so an absmax scale (``max|w| / 3``) would push every
  small weight out to ``+-max|w| / 3`` (relative error ~0.98 on Gaussian
  weights, cosine ~0 on a real BERT); 0.624 * mean|w| is the MSE-optimal
  uniform 4-level step for Gaussian weights (Lloyd: step 0.9957 sigma, sigma =
  1.2533 mean|w|, s = step / 2), relative error ~0.12.
* int4 / int8 (absmax): ``s = max(max|w|, eps) / qmax``, ``q = clamp(round(w / s), -qmax, qmax)``,
  ``qmax`` = 7 / 127

Activations (``x`` is ``[tokens, in]``; a granule is the whole tensor or a row):

* int8 (absmax): ``a = max(max|x|, eps)``, ``q = clamp(round(float32(x) * (127 / a)), -127, 127)``,
  dequantization scale ``a / 127``.  Kernels that fuse this step must compute
  ``127 / a`` and the product in float32 with round-half-to-even, exactly so.
* binary: ``q = +1 if x >= 0 else -1``, scale ``mean|x|``.

``round`` is round-half-to-even (``torch.round``); ``eps = 1e-5``.

STE: the fake-quantized forward returns the dequantized tensor; the backward
is the identity for weights and int8 activations, and ``1{|x| <= 1}`` times the
(detached) scale for the sign of binary activations (the hardtanh STE of BNNs).
Scales are treated as constants in the backward pass.

Example::

    values, scale = quantize_weight(torch.randn(8, 16), BitQuantConfig(weight_bits=1.58))
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from bitcore.config import BitQuantConfig
from bitcore.errors import QuantizationError

EPS = 1e-5
_QMAX = {4: 7, 8: 127}
INT2_MEAN_ABS_FACTOR = 0.624  # see the module docstring


# ---------------------------------------------------------------- weights
def _granules(w: torch.Tensor, granularity: str, group_size: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """View ``w`` as [n_granules, granule_len] (zero-padded) plus the true element count of each."""
    out_f, in_f = w.shape
    if granularity == "per_tensor":
        return w.reshape(1, -1), torch.tensor([w.numel()], device=w.device)
    if granularity == "per_channel":
        return w, torch.full((out_f,), in_f, device=w.device)
    n_groups = (in_f + group_size - 1) // group_size
    padded = torch.zeros(out_f, n_groups * group_size, dtype=w.dtype, device=w.device)
    padded[:, :in_f] = w
    counts = torch.full((n_groups,), group_size, device=w.device)
    counts[-1] = in_f - (n_groups - 1) * group_size
    return padded.reshape(out_f * n_groups, group_size), counts.repeat(out_f)


def _scale_shape(granularity: str, out_f: int, in_f: int, group_size: Optional[int]) -> tuple:
    from bitcore.packing import scale_shape

    return scale_shape(granularity, out_f, in_f, group_size)


def _expand(scale: torch.Tensor, granularity: str, in_f: int, group_size: Optional[int]) -> torch.Tensor:
    if granularity == "per_tensor":
        return scale.view(1, 1)
    if granularity == "per_channel":
        return scale.view(-1, 1)
    return scale.repeat_interleave(group_size, dim=1)[:, :in_f]


def weight_scale(w: torch.Tensor, cfg: BitQuantConfig) -> torch.Tensor:
    """float32 scale of ``w`` in the canonical shape for ``cfg.weight_granularity``."""
    _check_weight(w)
    wf = w.detach().float()
    granules, counts = _granules(wf, cfg.weight_granularity, cfg.group_size)
    absw = granules.abs()
    if cfg.weight_bits in (1, 1.58, 2):
        s = absw.sum(dim=1) / counts.to(torch.float32)
        if cfg.weight_bits == 1.58:
            s = s.clamp(min=EPS)
        elif cfg.weight_bits == 2:
            s = s.clamp(min=EPS) * INT2_MEAN_ABS_FACTOR
    else:
        s = absw.amax(dim=1).clamp(min=EPS) / _QMAX[cfg.weight_bits]
    return s.reshape(_scale_shape(cfg.weight_granularity, *w.shape, cfg.group_size))


def _quantize_with_scale(w: torch.Tensor, scale_full: torch.Tensor, bits: Union[int, float]) -> torch.Tensor:
    if bits == 1:
        return torch.where(w >= 0, 1.0, -1.0)
    r = w / scale_full
    if bits == 1.58:
        return r.round().clamp(-1, 1)
    if bits == 2:
        return (2 * torch.round((r - 1) / 2) + 1).clamp(-3, 3)
    qmax = _QMAX[bits]
    return r.round().clamp(-qmax, qmax)


def quantize_weight(w: torch.Tensor, cfg: BitQuantConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [out, in]`` -> (int8 integer values, float32 scale in canonical shape)."""
    scale = weight_scale(w, cfg)
    full = _expand(scale, cfg.weight_granularity, w.shape[1], cfg.group_size)
    q = _quantize_with_scale(w.detach().float(), full, cfg.weight_bits)
    return q.to(torch.int8), scale


def fake_quantize_weight(w: torch.Tensor, cfg: BitQuantConfig) -> torch.Tensor:
    """Dequantized ``w`` in its own dtype, with an identity (straight-through) gradient."""
    values, scale = quantize_weight(w, cfg)
    full = _expand(scale, cfg.weight_granularity, w.shape[1], cfg.group_size)
    deq = (values.to(torch.float32) * full).to(w.dtype)
    return w + (deq - w).detach()


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise QuantizationError(f"weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise QuantizationError(f"weight must be floating point to quantize, got {w.dtype}")
    if w.numel() and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise QuantizationError(f"weight contains {bad} NaN/Inf value(s); cannot quantize")


# ------------------------------------------------------------ activations
def _row_reduce(x: torch.Tensor, granularity: str, op: str) -> torch.Tensor:
    a = x.abs()
    if granularity == "per_tensor":
        r = a.amax() if op == "max" else a.mean()
        return r.reshape(1, 1).expand(x.shape[0], 1) if x.shape[0] else r.reshape(1, 1)[:0]
    if op == "max":
        return a.amax(dim=-1, keepdim=True) if x.shape[-1] else torch.zeros(x.shape[0], 1, device=x.device)
    return a.mean(dim=-1, keepdim=True)


def quantize_activation_int8(x: torch.Tensor, granularity: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [tokens, in]`` -> (int8 values, float32 dequant scale ``[tokens, 1]``)."""
    xf = x.detach().float()
    if xf.numel() == 0:
        return torch.zeros_like(xf, dtype=torch.int8), torch.ones(xf.shape[0], 1, device=x.device)
    amax = _row_reduce(xf, granularity, "max").clamp(min=EPS)
    q = torch.round(xf * (127.0 / amax)).clamp(-127, 127).to(torch.int8)
    return q, amax / 127.0


def quantize_activation_binary(x: torch.Tensor, granularity: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [tokens, in]`` -> (int8 signs in {-1, +1}, float32 scale mean|x| ``[tokens, 1]``)."""
    xf = x.detach().float()
    signs = torch.where(xf >= 0, 1, -1).to(torch.int8)
    if xf.numel() == 0:
        return signs, torch.ones(xf.shape[0], 1, device=x.device)
    return signs, _row_reduce(xf, granularity, "mean")


class _BinarySTE(torch.autograd.Function):
    """sign(x) * scale forward; grad * scale * 1{|x| <= 1} backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, scale)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype) * scale.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale = ctx.saved_tensors
        return grad * scale.to(grad.dtype) * (x.abs() <= 1).to(grad.dtype), None


def fake_quantize_activation(x: torch.Tensor, cfg: BitQuantConfig) -> torch.Tensor:
    """Quantize-dequantize activations ``[..., in]`` per ``cfg`` with an STE gradient."""
    if cfg.float_activations:
        return x
    flat = x.reshape(-1, x.shape[-1])
    if cfg.activation_dtype == "int8":
        q, scale = quantize_activation_int8(flat, cfg.activation_granularity)
        deq = (q.to(torch.float32) * scale).to(x.dtype).reshape(x.shape)
        return x + (deq - x).detach()
    _, scale = quantize_activation_binary(flat, cfg.activation_granularity)
    return _BinarySTE.apply(flat, scale).reshape(x.shape)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """sign(x) in {-1, +1} (0 maps to +1) with the hardtanh STE; used by ``BinaryActivation``."""
    return _BinarySTE.apply(x, torch.ones((), dtype=x.dtype, device=x.device))
