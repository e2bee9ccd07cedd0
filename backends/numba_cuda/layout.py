"""Weight re-layout for the numba_cuda kernels (plain torch: no numba needed, runs once per layer).

Two prepared layouts, both ``int64`` words ``[out_features, words_per_row]``.

Lane-interleaved sign codes (``interleave_sign_codes``; float and int8 activations)
-----------------------------------------------------------------------------------
Each weight value ``v`` is stored as a *sign code*: ternary uses 2 bits,
bit 0 = ``v != 0`` and bit 1 = ``v < 0`` (0 -> 00, +1 -> 01, -1 -> 11); binary
uses 1 bit, 1 for ``-1``.  A row is cut into chunks of ``32 * codes_per_word``
inputs (1024 ternary, 2048 binary); word ``lane`` of chunk ``c`` holds, for
``j = 0 .. codes_per_word - 1``::

    k    = c * chunk + j * 32 + lane         # the input this code belongs to
    code = (word >> (bits * j)) & (2**bits - 1)

so the 32 lanes of a warp load 32 consecutive words (256 coalesced bytes) and,
for every ``j``, read 32 *consecutive* activations ``x[k]``: coalesced, and each
activation is loaded once per lane and reused for all rows the warp owns.
Codes for ``k >= in_features`` are padding (zero); the kernels stop before them.

Why sign codes: moved to bits 30-31 of a float32 (one shift, one and), the
ternary code *is* the float ``2 v`` (``0x40000000`` = 2.0, ``0xC0000000`` =
-2.0, 0 = 0.0); binary sets bit 30 too.  So a float kernel spends two integer
operations and one fused multiply-add per weight, with no int-to-float
conversion, and every product ``x * 2v`` is exact.

Plain sign bits (``sign_words``; binary weights with binary activations)
-----------------------------------------------------------------------
The canonical 1-bit layout (bit ``k % 8`` of byte ``k // 8`` is 1 for +1)
read as little-endian int64: word ``q`` bit ``j`` is input ``k = 64 q + j``.
Rows are zero-padded to whole words.  Activation signs are packed the same
way, so ``dot = in_features - 2 * popcount(w_word ^ x_word)`` summed over words
(padding bits are 0 in both, so they never differ).
"""
from __future__ import annotations

import torch

from bitcore.errors import PackingError
from bitcore.packing import PackedWeight, unpack_values

LANES = 32


def sign_code_bits(weight_bits) -> int:
    """Bits of one sign code: 2 for ternary, 1 for binary."""
    if weight_bits == 1.58:
        return 2
    if weight_bits == 1:
        return 1
    raise PackingError(f"numba_cuda weights: got weight_bits={weight_bits!r}; expected 1 or 1.58")


def codes_per_word(bits: int) -> int:
    return 64 // bits


def chunk_inputs(bits: int) -> int:
    """Inputs covered by one chunk of 32 words (1024 ternary, 2048 binary)."""
    return LANES * codes_per_word(bits)


def _words_from_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """OR ``fields[..., j] << (bits * j)`` along the last dim into int64 words (two's complement)."""
    shifts = torch.arange(fields.shape[-1], device=fields.device, dtype=torch.int64) * bits
    # Fields occupy disjoint bits, so their sum is their OR; int64 addition wraps modulo 2**64,
    # which keeps the top bit right when a field reaches bit 63.
    return (fields.to(torch.int64) << shifts).sum(dim=-1)


def interleave_sign_codes(packed: PackedWeight) -> torch.Tensor:
    """Canonical packed ternary/binary weight -> lane-interleaved sign-code words (see module doc)."""
    bits = sign_code_bits(packed.weight_bits)
    values = unpack_values(packed).to(torch.int64)  # [out, in] in {-1, 0, +1}
    negative = (values < 0).to(torch.int64)
    codes = (values != 0).to(torch.int64) | (negative << 1) if bits == 2 else negative
    n, k = codes.shape
    chunk = chunk_inputs(bits)
    n_chunks = max(1, -(-k // chunk))
    padded = torch.zeros(n, n_chunks * chunk, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes
    # [n, chunk, j, lane] -> [n, chunk, lane, j]: the j-th field of lane's word is input c*chunk + j*32 + lane
    fields = padded.view(n, n_chunks, codes_per_word(bits), LANES).transpose(2, 3)
    return _words_from_fields(fields, bits).reshape(n, n_chunks * LANES).contiguous()


def sign_words(bits01: torch.Tensor) -> torch.Tensor:
    """``[rows, k]`` tensor of 0/1 -> ``[rows, ceil(k / 64)]`` int64 words, input ``64 q + j`` at bit ``j``."""
    rows, k = bits01.shape
    n_words = max(1, -(-k // 64))
    padded = torch.zeros(rows, n_words * 64, dtype=torch.int64, device=bits01.device)
    padded[:, :k] = bits01
    return _words_from_fields(padded.view(rows, n_words, 64), 1).contiguous()


def weight_sign_words(packed: PackedWeight) -> torch.Tensor:
    """Binary weight -> sign words (bit 1 for +1), the canonical bits re-read as int64."""
    if packed.weight_bits != 1:
        raise PackingError(f"sign words need binary weights; got weight_bits={packed.weight_bits!r}")
    return sign_words((unpack_values(packed) > 0).to(torch.int64))
