"""Re-layout of canonical packed weights into the lane tiles the CUDA kernels read.

The layout and bit placement are documented at the top of ``csrc/bitlab_mma.cuh``
(the one place they are defined for the kernels); this module builds them with
plain torch ops, once per weight, on the weight's device.

Example::

    wq = lane_tiles(packed, path="float")   # int32, ready for torch.ops.bitlab.cuda_ext_linear
"""
from __future__ import annotations

import torch

from bitcore.packing import PackedWeight, storage_bits, unpack_codes

CHUNK = 128  # input columns per chunk
ROW_PAD = 128  # rows are padded to the GEMM block height
FORMAT_CODE = {1: 0, 1.58: 1, 2: 2, 4: 3, 8: 4}


def padded_k(in_features: int) -> int:
    return (in_features + CHUNK - 1) // CHUNK * CHUNK


def padded_n(out_features: int) -> int:
    return (out_features + ROW_PAD - 1) // ROW_PAD * ROW_PAD


def _lane_element_map(path: str, bits: int):
    """(row in tile, column in chunk, bit in word) of each lane's 64 elements, [32, 64] each, word-major."""
    rows = torch.empty(32, 64, dtype=torch.long)
    cols = torch.empty(32, 64, dtype=torch.long)
    shifts = torch.empty(64, dtype=torch.long)
    per_reg = 2 if path == "float" else 4
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for r in range(64 // per_reg):
            j, R = divmod(r, 4)
            for e in range(per_reg):
                idx = r * per_reg + e
                rows[lane, idx] = g + 8 * (R & 1)
                if path == "float":
                    cols[lane, idx] = 32 * t + 4 * j + 2 * (R >> 1) + e
                else:
                    cols[lane, idx] = 32 * t + 8 * j + 4 * (R >> 1) + e
    for r in range(64 // per_reg):
        for e in range(per_reg):
            idx = r * per_reg + e
            if path == "float":
                pairs = 16 // bits
                shifts[idx] = (r % pairs) * bits + 16 * e
            else:
                s = r % (8 // bits)
                shifts[idx] = {
                    1: 4 * e + (s & 3) + 16 * (s >> 2),
                    2: 4 * e + 2 * (s & 1) + 16 * (s >> 1),
                    4: 8 * e + 4 * s,
                    8: 8 * e,
                }[bits]
    return rows, cols, shifts


# Ternary codes of each path, indexed by the canonical code (0 -> 0, 1 -> +1, 2 -> -1; 3 is unused).
# float: u = value + 1, so one fma maps it to the value.  int8: +1 -> 0, -1 -> 1, 0 -> 2, the order
# bitlab_mma.cuh's decode_s8 reads with prmt without shifting an odd slot's codes.
TERNARY_FLOAT_CODES = (1, 2, 0, 0)
TERNARY_INT8_CODES = (2, 0, 1, 2)


def _codes_for_path(packed: PackedWeight, path: str) -> torch.Tensor:
    codes = unpack_codes(packed.data, packed.storage_bits, packed.in_features)
    if packed.weight_bits == 1.58:
        table = TERNARY_FLOAT_CODES if path == "float" else TERNARY_INT8_CODES
        lut = torch.tensor(table, dtype=torch.uint8, device=codes.device)
        codes = lut[codes.long()]
    return codes


def padding_code(weight_bits, path: str) -> int:
    """The code padded rows and columns hold: 0, except int8-path ternary, whose zero-value code is 2."""
    return TERNARY_INT8_CODES[0] if weight_bits == 1.58 and path == "int8" else 0


def lane_tiles(packed: PackedWeight, path: str) -> torch.Tensor:
    """int32 lane tiles of ``packed`` for the ``"float"`` (half/bf16 mma) or ``"int8"`` path."""
    if path not in ("float", "int8"):
        raise ValueError(f"path: got {path!r}; expected 'float' or 'int8'")
    bits = storage_bits(packed.weight_bits)
    n, k = packed.out_features, packed.in_features
    npad, kp = padded_n(n), padded_k(k)
    codes = torch.full((npad, kp), padding_code(packed.weight_bits, path), dtype=torch.uint8, device=packed.device)
    codes[:n, :k] = _codes_for_path(packed, path)
    n_tiles, n_chunks = npad // 16, kp // CHUNK
    wpl = 2 * bits
    unit = min(4, wpl)
    rows, cols, shifts = _lane_element_map(path, bits)
    gather = (rows * CHUNK + cols).reshape(-1).to(packed.device)
    shifts = shifts.to(packed.device)
    tiles_per_step = max(1, (1 << 24) // (n_chunks * 16 * CHUNK))  # bounds the int64 scratch to 128 MB
    out = torch.empty(n_tiles, n_chunks, wpl // unit, 32, unit, dtype=torch.int32, device=packed.device)
    for t0 in range(0, n_tiles, tiles_per_step):
        t1 = min(n_tiles, t0 + tiles_per_step)
        block = codes[t0 * 16 : t1 * 16].view(t1 - t0, 16, n_chunks, CHUNK).permute(0, 2, 1, 3)
        block = block.reshape(t1 - t0, n_chunks, 16 * CHUNK)
        elems = block[:, :, gather].view(t1 - t0, n_chunks, 32, 64).to(torch.int64) << shifts
        words = elems.view(t1 - t0, n_chunks, 32, wpl, 64 // wpl).sum(dim=-1)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        out[t0:t1] = words.view(t1 - t0, n_chunks, 32, wpl // unit, unit).permute(0, 1, 3, 2, 4)
    return out.reshape(-1)


def xnor_bits(packed: PackedWeight) -> torch.Tensor:
    """Binary weight bits as int32 words [Npad, Kp / 32] (canonical bytes read little-endian, zero-padded)."""
    if packed.weight_bits != 1:
        raise ValueError(f"xnor_bits needs binary weights, got weight_bits={packed.weight_bits!r}")
    n, k = packed.out_features, packed.in_features
    npad, kp = padded_n(n), padded_k(k)
    data = torch.zeros(npad, kp // 8, dtype=torch.uint8, device=packed.device)
    data[:n, : packed.data.shape[1]] = packed.data
    if k % 8:
        # Tail bits of the last byte are zero by the packing contract; clear them anyway.
        data[:n, k // 8] &= (1 << (k % 8)) - 1
    return data.view(torch.int32).contiguous()
