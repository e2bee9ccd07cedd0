"""Canonical packed weight formats: pack/unpack with a documented bit layout.

Every backend receives weights in this one format and may re-layout them once
for speed in its kernel's ``prepare`` step.

Bit layout
----------
A weight matrix ``W[out_features, in_features]`` is stored as ``uint8`` codes of
``b`` bits (``b = storage_bits(weight_bits)``), packed **along in_features**,
row-major, little-endian inside each byte::

    per_byte = 8 // b
    byte  = row * row_bytes + k // per_byte
    shift = (k % per_byte) * b          # element k=0 sits in the lowest bits
    code  = (data[row, k // per_byte] >> shift) & (2**b - 1)

``row_bytes = ceil(in_features / per_byte)``.  When ``in_features`` is not a
multiple of ``per_byte`` the tail codes of each row are zero bits; the true
``in_features`` is kept in :class:`PackedWeight` so kernels never read past it.

Codes and the integer value they stand for (``dequantized = value * scale``):

=============  ======  =============================================
weight_bits    b       code -> value
=============  ======  =============================================
1 (binary)     1       0 -> -1, 1 -> +1              (value = 2c - 1)
1.58 (ternary) 2       0 -> 0, 1 -> +1, 2 -> -1      (value = (c & 1) - (c >> 1)); 3 is invalid
2              2       c -> 2c - 3, i.e. {-3, -1, +1, +3}
4              4       c -> c - 8, i.e. [-8, 7] (quantizers use [-7, 7])
8              8       c -> c - 128, i.e. [-128, 127] (quantizers use [-127, 127])
=============  ======  =============================================

Scales are float32: shape ``[1]`` (per_tensor), ``[out_features]``
(per_channel) or ``[out_features, ceil(in_features / group_size)]`` (per_group;
the last group of a row may be short).

Example::

    packed = pack_weight(values, scale, weight_bits=1.58, granularity="per_channel")
    assert torch.equal(unpack_values(packed), values)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from bitcore.errors import PackingError

_STORAGE_BITS = {1: 1, 1.58: 2, 2: 2, 4: 4, 8: 8}
# Range of the integer *values* each format can hold.
VALUE_RANGE = {1: (-1, 1), 1.58: (-1, 1), 2: (-3, 3), 4: (-8, 7), 8: (-128, 127)}


def storage_bits(weight_bits: Union[int, float]) -> int:
    """Bits per weight in the canonical packed format (ternary costs 2 bits)."""
    try:
        return _STORAGE_BITS[weight_bits]
    except KeyError:
        raise PackingError(
            f"weight_bits: got {weight_bits!r}; packed formats exist for {sorted(_STORAGE_BITS)}"
        ) from None


def row_bytes(in_features: int, weight_bits: Union[int, float]) -> int:
    per_byte = 8 // storage_bits(weight_bits)
    return (in_features + per_byte - 1) // per_byte


@dataclass
class PackedWeight:
    """A packed weight matrix plus everything needed to read it back."""

    data: torch.Tensor  # uint8 [out_features, row_bytes]
    scale: torch.Tensor  # float32, see module docstring
    weight_bits: Union[int, float]
    in_features: int
    out_features: int
    granularity: str = "per_tensor"
    group_size: Optional[int] = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def storage_bits(self) -> int:
        return storage_bits(self.weight_bits)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        """Bytes of packed data plus scales: the true memory of the weight."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def validate(self) -> None:
        if self.data.dtype != torch.uint8:
            raise PackingError(f"packed data must be torch.uint8, got {self.data.dtype}")
        expected = (self.out_features, row_bytes(self.in_features, self.weight_bits))
        if tuple(self.data.shape) != expected:
            raise PackingError(
                f"packed data shape {tuple(self.data.shape)} does not match "
                f"out_features={self.out_features}, in_features={self.in_features} at "
                f"{self.weight_bits} bits: expected {expected}"
            )
        expected_scale = scale_shape(self.granularity, self.out_features, self.in_features, self.group_size)
        if tuple(self.scale.shape) != expected_scale:
            raise PackingError(
                f"scale shape {tuple(self.scale.shape)} does not match granularity "
                f"{self.granularity!r}: expected {expected_scale}"
            )
        if self.scale.dtype != torch.float32:
            raise PackingError(f"scale must be torch.float32, got {self.scale.dtype}")


def scale_shape(granularity: str, out_features: int, in_features: int, group_size: Optional[int]) -> tuple:
    if granularity == "per_tensor":
        return (1,)
    if granularity == "per_channel":
        return (out_features,)
    if granularity == "per_group":
        if not group_size:
            raise PackingError("per_group granularity needs a group_size")
        return (out_features, (in_features + group_size - 1) // group_size)
    raise PackingError(
        f"granularity: got {granularity!r}; allowed values are ['per_tensor', 'per_channel', 'per_group']"
    )


def values_to_codes(values: torch.Tensor, weight_bits: Union[int, float]) -> torch.Tensor:
    """Integer weight values -> uint8 codes (see the table in the module docstring)."""
    v = values.to(torch.int16)
    storage_bits(weight_bits)  # raises with the allowed list for an unknown width
    lo, hi = VALUE_RANGE[weight_bits]
    if v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
        raise PackingError(
            f"weight values out of range for {weight_bits}-bit weights: "
            f"min {int(v.min())}, max {int(v.max())}, allowed [{lo}, {hi}]"
        )
    if weight_bits == 1:
        if v.numel() and bool((v == 0).any()):
            raise PackingError("binary weights must be -1 or +1; found 0")
        codes = (v > 0).to(torch.int16)
    elif weight_bits == 1.58:
        codes = torch.where(v < 0, torch.full_like(v, 2), v)
    elif weight_bits == 2:
        if v.numel() and bool(((v % 2) == 0).any()):
            raise PackingError("2-bit weights must be one of -3, -1, +1, +3; found an even value")
        codes = (v + 3) // 2
    elif weight_bits == 4:
        codes = v + 8
    else:
        codes = v + 128
    return codes.to(torch.uint8)


def codes_to_values(codes: torch.Tensor, weight_bits: Union[int, float]) -> torch.Tensor:
    """uint8 codes -> int8 integer values."""
    c = codes.to(torch.int16)
    if weight_bits == 1:
        v = 2 * c - 1
    elif weight_bits == 1.58:
        if c.numel() and bool((c == 3).any()):
            raise PackingError("ternary code 3 is invalid (codes are 0 -> 0, 1 -> +1, 2 -> -1)")
        v = (c & 1) - (c >> 1)
    elif weight_bits == 2:
        v = 2 * c - 3
    elif weight_bits == 4:
        v = c - 8
    elif weight_bits == 8:
        v = c - 128
    else:
        storage_bits(weight_bits)
        raise AssertionError("unreachable")
    return v.to(torch.int8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[rows, k]`` of ``bits`` bits each into bytes along k (little-endian)."""
    if codes.dim() != 2:
        raise PackingError(f"pack_codes expects a 2-D tensor [rows, k], got shape {tuple(codes.shape)}")
    per_byte = 8 // bits
    rows, k = codes.shape
    padded_k = ((k + per_byte - 1) // per_byte) * per_byte
    c = torch.zeros(rows, padded_k, dtype=torch.int32, device=codes.device)
    c[:, :k] = codes.to(torch.int32)
    c = c.view(rows, padded_k // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(data: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: bytes ``[rows, row_bytes]`` -> codes ``[rows, k]``."""
    per_byte = 8 // bits
    if data.dim() != 2 or data.shape[1] * per_byte < k:
        raise PackingError(
            f"packed data shape {tuple(data.shape)} cannot hold {k} codes of {bits} bits per row"
        )
    shifts = torch.arange(per_byte, device=data.device, dtype=torch.int32) * bits
    mask = (1 << bits) - 1
    c = (data.to(torch.int32).unsqueeze(-1) >> shifts) & mask
    return c.reshape(data.shape[0], -1)[:, :k].to(torch.uint8)


def pack_weight(
    values: torch.Tensor,
    scale: torch.Tensor,
    weight_bits: Union[int, float],
    granularity: str = "per_tensor",
    group_size: Optional[int] = None,
) -> PackedWeight:
    """Pack integer weight values ``[out, in]`` and their scales into the canonical format."""
    if values.dim() != 2:
        raise PackingError(f"weights must be 2-D [out_features, in_features], got shape {tuple(values.shape)}")
    if values.dtype.is_floating_point:
        if values.numel() and not torch.equal(values, values.round()):
            raise PackingError("pack_weight expects integer values; quantize the weight first")
    out_features, in_features = values.shape
    codes = values_to_codes(values, weight_bits)
    data = pack_codes(codes, storage_bits(weight_bits))
    return PackedWeight(
        data=data,
        scale=scale.detach().to(torch.float32).reshape(
            scale_shape(granularity, out_features, in_features, group_size)
        ),
        weight_bits=weight_bits,
        in_features=in_features,
        out_features=out_features,
        granularity=granularity,
        group_size=group_size if granularity == "per_group" else None,
    )


def unpack_values(packed: PackedWeight) -> torch.Tensor:
    """Integer values ``[out, in]`` (int8) of a packed weight."""
    codes = unpack_codes(packed.data, packed.storage_bits, packed.in_features)
    return codes_to_values(codes, packed.weight_bits)


def expand_scale(packed: PackedWeight) -> torch.Tensor:
    """Per-element float32 scale ``[out, in]`` (or broadcastable) for dequantization."""
    s = packed.scale
    if packed.granularity == "per_tensor":
        return s.view(1, 1)
    if packed.granularity == "per_channel":
        return s.view(-1, 1)
    return s.repeat_interleave(packed.group_size, dim=1)[:, : packed.in_features]


def dequantize(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weights ``[out, in]``: value * scale."""
    w = unpack_values(packed).to(torch.float32) * expand_scale(packed)
    return w.to(dtype)
