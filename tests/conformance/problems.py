"""Hypothesis strategies that draw one kernel problem for a key: shapes, dtypes, layouts, weights.

Shapes: batch 0..64; in/out features 1..4097 with primes and powers of two
and their neighbours.  To keep CI fast the weight matrix is capped at
``max_weight_elements`` (out_features is reduced when in_features is large,
so 4097 still appears on each side, just not on both at once).

Tensors come from a drawn seed, so every example is fresh random data and
hypothesis can replay and shrink a failure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from hypothesis import strategies as st

from bitcore.config import BitQuantConfig
from bitcore.kernels import EPILOGUES, KernelKey
from bitcore.packing import PackedWeight, pack_weight, scale_shape
from bitcore.quantize import quantize_weight

EDGE_FEATURES = [127, 128, 129, 251, 256, 257, 509, 1021, 1024, 2053, 4093, 4096, 4097]
GROUP_SIZES = [7, 32, 64, 100, 128]
X_DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # what kernels take (interface.py)
LAYER_DTYPES = X_DTYPES + [torch.float64]  # what BitLinear takes
LAYOUTS = ["contiguous", "transposed", "column_stride", "offset_rows"]
# Integer weight values allowed by each format, largest magnitude last.
WEIGHT_VALUES = {1: [-1, 1], 1.58: [-1, 0, 1], 2: [-3, -1, 1, 3], 4: list(range(-7, 8)), 8: list(range(-127, 128))}
# Largest |output| the probe may reach so that it stays exact and finite in each output dtype.
PROBE_LIMIT = {torch.float32: 2**24, torch.bfloat16: 2**24, torch.float16: 60000, torch.float64: 2**24}

# Three draws in four are small (fast, and where off-by-one bugs show); one in four an edge size.
small_features = st.integers(1, 96)
features = st.one_of(small_features, small_features, small_features, st.sampled_from(EDGE_FEATURES))
batches = st.one_of(st.just(0), st.just(1), st.integers(0, 64))


@dataclass
class Problem:
    config: BitQuantConfig
    x: torch.Tensor
    packed: PackedWeight
    bias: Optional[torch.Tensor]
    activation: str
    probe: bool  # the exactness probe: the reference output is the exact integer accumulation
    layout: str

    def describe(self) -> str:
        return (
            f"{self.config.describe()} group_size={self.config.group_size} x={tuple(self.x.shape)} "
            f"{self.x.dtype} {self.layout} stride={self.x.stride()} W={self.packed.out_features}x"
            f"{self.packed.in_features} bias={self.bias is not None} epilogue={self.activation} probe={self.probe}"
        )


def packed_to(packed: PackedWeight, device) -> PackedWeight:
    """The same packed weight on ``device``."""
    return PackedWeight(packed.data.to(device), packed.scale.to(device), packed.weight_bits, packed.in_features,
                        packed.out_features, packed.granularity, packed.group_size)


def config_from_key(key: KernelKey, group_size: int) -> BitQuantConfig:
    bits = 1.58 if key.weight_bits == 1.58 else int(key.weight_bits)
    act_gran = "per_tensor" if key.activation_granularity == "none" else key.activation_granularity
    return BitQuantConfig(
        weight_bits=bits,
        weight_granularity=key.weight_granularity,
        group_size=group_size,
        activation_dtype=key.activation_dtype,
        activation_granularity=act_gran,
    )


def layout_as(x: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """The same values as ``x`` in the given memory layout (strided views of a larger buffer)."""
    rows, cols = x.shape
    if layout == "transposed":
        return x.T.contiguous().T
    if layout == "column_stride":
        buf = torch.randn(rows, 2 * cols, generator=gen).to(x.dtype)
        buf[:, ::2] = x
        return buf[:, ::2]
    if layout == "offset_rows":
        buf = torch.randn(rows + 1, cols + 3, generator=gen).to(x.dtype)
        buf[1:, 3:] = x
        return buf[1:, 3:]
    return x


def _random_weight(cfg: BitQuantConfig, out_f: int, in_f: int, gen: torch.Generator) -> PackedWeight:
    w = torch.randn(out_f, in_f, generator=gen) / (in_f**0.5)
    if torch.rand((), generator=gen) < 0.3:  # a few outliers, as trained weights have
        w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 97),), generator=gen)] *= 8
    values, scale = quantize_weight(w, cfg)
    group = cfg.group_size if cfg.weight_granularity == "per_group" else None
    return pack_weight(values, scale, cfg.weight_bits, cfg.weight_granularity, group)


def _probe_bounds(cfg: BitQuantConfig, in_f: int, dtype: torch.dtype, activation: str):
    """(largest |weight value|, largest |x| off the 127 element) keeping every output exact; None if impossible."""
    limit = PROBE_LIMIT[dtype]
    if activation == "relu2":
        limit = int(min(limit, torch.finfo(dtype).max ** 0.5 / 4))
    fmt_max = max(WEIGHT_VALUES[cfg.weight_bits])
    if cfg.activation_dtype == "binary":  # x in {-1, +1}: |acc| <= in_f * |w|max
        # The binary scale mean|x| = 1 may round to 1 - 2^-24 on a device that divides by multiplying with
        # 1/n, so this probe is checked to 8 ulp (not ==): keep |acc| < 2^20 so that still catches an error
        # of 1, and float32 outputs only (a float16/bfloat16 output's spacing would hide it).
        if dtype != torch.float32:
            return None
        w_max = min(fmt_max, min(limit, 2**20) // in_f)
        return (w_max, 1) if w_max >= 1 else None
    for w_max in sorted({fmt_max, 3, 1} & set(range(1, fmt_max + 1)), reverse=True):
        if 127 * w_max > limit:
            continue
        m = 127 if in_f == 1 else min(126, (limit - 127 * w_max) // ((in_f - 1) * w_max))
        if m >= 1:
            return w_max, m
    return None


def _probe_weight(cfg: BitQuantConfig, out_f: int, in_f: int, w_max: int, gen: torch.Generator) -> PackedWeight:
    allowed = torch.tensor([v for v in WEIGHT_VALUES[cfg.weight_bits] if abs(v) <= w_max], dtype=torch.int8)
    values = allowed[torch.randint(0, len(allowed), (out_f, in_f), generator=gen)]
    group = cfg.group_size if cfg.weight_granularity == "per_group" else None
    scale = torch.ones(scale_shape(cfg.weight_granularity, out_f, in_f, group))
    return pack_weight(values, scale, cfg.weight_bits, cfg.weight_granularity, group)


def _probe_input(cfg: BitQuantConfig, batch: int, in_f: int, m: int, gen: torch.Generator) -> torch.Tensor:
    if cfg.activation_dtype == "binary":  # mean|x| = 1 exactly
        return torch.randint(0, 2, (batch, in_f), generator=gen).float() * 2 - 1
    x = torch.randint(-m, m + 1, (batch, in_f), generator=gen).float()
    if batch:  # each row's max |x| is exactly 127, so every activation scale is 1.0
        col = torch.randint(0, in_f, (batch,), generator=gen)
        sign = torch.randint(0, 2, (batch,), generator=gen).float() * 2 - 1
        x[torch.arange(batch), col] = 127.0 * sign
    return x


@st.composite
def problems(draw, key: KernelKey, max_weight_elements: int) -> Problem:
    """One fresh problem for ``key``; see the module docstring."""
    in_f = draw(features, label="in_features")
    out_f = draw(features, label="out_features")
    out_f = max(1, min(out_f, max_weight_elements // in_f))
    batch = draw(batches, label="batch")
    dtype = draw(st.sampled_from(X_DTYPES), label="x_dtype")
    layout = draw(st.sampled_from(LAYOUTS), label="layout")
    activation = draw(st.sampled_from(EPILOGUES), label="epilogue")
    has_bias = draw(st.booleans(), label="bias")
    group_size = draw(st.sampled_from(GROUP_SIZES), label="group_size") if key.weight_granularity == "per_group" else 128
    cfg = config_from_key(key, group_size)
    integer_path = not cfg.float_activations
    bounds = _probe_bounds(cfg, in_f, dtype, activation) if integer_path else None
    probe = bounds is not None and draw(st.booleans(), label="exactness_probe")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")

    gen = torch.Generator().manual_seed(seed)
    if probe:
        w_max, m = bounds
        packed = _probe_weight(cfg, out_f, in_f, w_max, gen)
        x = _probe_input(cfg, batch, in_f, m, gen)
        bias = torch.randn(out_f, generator=gen) if has_bias else None
    else:
        packed = _random_weight(cfg, out_f, in_f, gen)
        x_scale = draw(st.sampled_from([1e-2, 1.0, 4.0]), label="x_scale")
        x = torch.randn(batch, in_f, generator=gen) * x_scale
        bias = torch.randn(out_f, generator=gen) * 0.1 if has_bias else None
    x = layout_as(x.to(dtype), layout, gen)
    bias = None if bias is None else bias.to(dtype)
    return Problem(cfg, x, packed, bias, activation, probe, layout)
