"""Reference math for every kernel key, in plain PyTorch.

This is the definition every other backend is tested against:

* float activations: ``x`` is rounded to the config's activation dtype, then
  ``y = float32(x) @ (values * scale).T`` in float32;
* int8 / binary activations: the activation is quantized as
  :mod:`bitcore.quantize` defines, the integer products are accumulated
  exactly (float64 holds every sum below 2**53, far above any int32 result),
  then ``y = acc * x_scale * w_scale`` in float32 (per group: summed over the
  groups of each row);
* then ``+ bias``, the epilogue (``relu``: max(y, 0); ``relu2``: max(y, 0)**2),
  and a cast to ``x.dtype``.

Exactness probe for integer paths: with every weight scale 1.0 and each input
row's max |x| exactly 127, ``x_scale`` is 1.0 and the output *is* the integer
accumulation (exact in float32 below 2**24); tests use this to demand
bit-exact agreement from other backends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from bitcore.config import BitQuantConfig
from bitcore.kernels.interface import ALL_KEYS, BitKernel, check_quantized_input
from bitcore.packing import PackedWeight, expand_scale, unpack_values
from bitcore.quantize import quantize_activation_binary, quantize_activation_int8

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ReferenceWeight:
    packed: PackedWeight
    values: torch.Tensor  # int8 [out, in], unpacked once
    config: BitQuantConfig


def apply_epilogue(y: torch.Tensor, bias: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    if bias is not None:
        y = y + bias.to(y.dtype)
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "relu2":
        y = torch.relu(y).square()
    elif activation != "none":
        raise ValueError(f"activation: got {activation!r}; allowed values are ['none', 'relu', 'relu2']")
    return y


def integer_accumulate(xq: torch.Tensor, values: torch.Tensor, group_size: Optional[int] = None) -> torch.Tensor:
    """Exact integer dot products ``[tokens, out]`` (or ``[tokens, out, groups]``) as float64."""
    a = xq.to(torch.float64)
    w = values.to(torch.float64)
    if group_size is None:
        return a @ w.T
    k = a.shape[1]
    n_groups = (k + group_size - 1) // group_size
    pad = n_groups * group_size - k
    a = torch.nn.functional.pad(a, (0, pad)).view(a.shape[0], n_groups, group_size)
    w = torch.nn.functional.pad(w, (0, pad)).view(w.shape[0], n_groups, group_size)
    return torch.einsum("mgk,ngk->mng", a, w)


def reference_linear(
    x: torch.Tensor, weight: ReferenceWeight, bias: Optional[torch.Tensor] = None, activation: str = "none"
) -> torch.Tensor:
    cfg, packed = weight.config, weight.packed
    if cfg.float_activations:
        xf = x.to(FLOAT_DTYPES[cfg.activation_dtype]).to(torch.float32)
        w = weight.values.to(torch.float32) * expand_scale(packed)
        y = xf @ w.T
    else:
        if cfg.activation_dtype == "int8":
            xq, x_scale = quantize_activation_int8(x, cfg.activation_granularity)
        else:
            xq, x_scale = quantize_activation_binary(x, cfg.activation_granularity)
        if packed.granularity == "per_group":
            acc = integer_accumulate(xq, weight.values, packed.group_size).to(torch.float32)
            y = (acc * packed.scale.unsqueeze(0)).sum(dim=-1) * x_scale
        else:
            y = dequantized_accumulate(xq, x_scale, weight)
    return apply_epilogue(y, None if bias is None else bias.float(), activation).to(x.dtype)


def dequantized_accumulate(xq: torch.Tensor, x_scale: torch.Tensor, weight: ReferenceWeight) -> torch.Tensor:
    """``acc * x_scale * w_scale`` in float32 for per-tensor / per-channel weights (exact integer acc)."""
    acc = integer_accumulate(xq, weight.values).to(torch.float32)
    return acc * x_scale * weight.packed.scale.view(1, -1)


class TorchReferenceKernel(BitKernel):
    """Serves every key on CPU and CUDA with the reference math (lowest priority)."""

    backend = "torch_ref"
    keys = ALL_KEYS
    devices = frozenset({"cpu", "cuda"})
    priority = 0

    def self_check(self):
        return None  # it is the definition the self-checks of other kernels compare with

    def prepare(self, packed: PackedWeight, config: BitQuantConfig) -> ReferenceWeight:
        return ReferenceWeight(packed=packed, values=unpack_values(packed), config=config)

    def forward(self, x, prepared, bias=None, activation="none"):
        in_features = prepared.packed.in_features
        if x.dim() != 2 or x.shape[1] != in_features:
            raise ValueError(f"x must be [tokens, in_features={in_features}] for this weight; got shape {tuple(x.shape)}")
        return reference_linear(x, prepared, bias, activation)

    def accepts_quantized(self, prepared) -> bool:
        return prepared.config.activation_dtype == "int8" and prepared.packed.granularity != "per_group"

    def forward_quantized(self, xq, x_scale, prepared, bias=None, activation="none", out_dtype=torch.float32):
        if not self.accepts_quantized(prepared):
            raise ValueError(f"{self.name}: pre-quantized input needs an int8-activation, per-tensor or per-channel weight")
        check_quantized_input(xq, x_scale, prepared.packed.in_features)
        y = dequantized_accumulate(xq, x_scale.reshape(-1, 1), prepared)
        return apply_epilogue(y, None if bias is None else bias.float(), activation).to(out_dtype)
