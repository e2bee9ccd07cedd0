"""Lane-tile layout (CPU): every weight lands exactly once, and the documented bit rules read it back."""
import re
from pathlib import Path

import pytest
import torch

from backends.cuda_ext import layout
from bitcore.packing import pack_weight

FORMATS = {1: (-1, 1), 1.58: (-1, 0, 1), 2: (-3, -1, 1, 3), 4: tuple(range(-8, 8)), 8: tuple(range(-128, 128))}


def random_values(bits, n, k, gen):
    choices = torch.tensor(FORMATS[bits], dtype=torch.int8)
    return choices[torch.randint(len(choices), (n, k), generator=gen)]


INT8_TERNARY_VALUES = torch.tensor([1, -1, 0, 10_000])  # code 3 never occurs


def code_to_value(code, bits, path):
    """The value each kernel decoder produces for a stored code (bitlab_mma.cuh)."""
    if bits == 1.58:
        return code - 1 if path == "float" else INT8_TERNARY_VALUES[code]
    offset = {1: (2, -1), 2: (2, -3), 4: (1, -8), 8: (1, -128)}[bits]
    return offset[0] * code + offset[1]


def read_back(words, bits, path, n, k, padded=False):
    """Invert the lane-tile layout with the documented rules; returns int values [n, k]."""
    b = 2 if bits == 1.58 else int(bits)
    npad, kp = layout.padded_n(n), layout.padded_k(k)
    wpl, unit = 2 * b, min(4, 2 * b)
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w.view(npad // 16, kp // 128, wpl // unit, 32, unit).permute(0, 1, 3, 2, 4).reshape(npad // 16, kp // 128, 32, wpl)
    rows, cols, shifts = layout._lane_element_map(path, b)
    word_of = torch.arange(64) // (64 // wpl)
    codes = (w[:, :, :, word_of] >> shifts) & ((1 << b) - 1)  # [tiles, chunks, 32, 64]
    out = torch.full((npad, kp), 10_000, dtype=torch.int64)
    tiles = torch.arange(npad // 16).view(-1, 1, 1, 1)
    chunks = torch.arange(kp // 128).view(1, -1, 1, 1)
    r = tiles * 16 + rows.view(1, 1, 32, 64)
    c = chunks * 128 + cols.view(1, 1, 32, 64)
    out[r.expand_as(codes).reshape(-1), c.expand_as(codes).reshape(-1)] = code_to_value(codes, bits, path).reshape(-1)
    assert int((out == 10_000).sum()) == 0, "some positions of the padded matrix were never written"
    return out if padded else out[:n, :k]


@pytest.mark.parametrize("path", ["float", "int8"])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
def test_lane_tiles_round_trip(bits, path):
    gen = torch.Generator().manual_seed(hash((bits, path)) % 2**31)
    n, k = 19, 300  # neither a multiple of 16 rows nor of 128 columns
    values = random_values(bits, n, k, gen)
    packed = pack_weight(values, torch.tensor([1.0]), bits)
    words = layout.lane_tiles(packed, path)
    assert words.dtype == torch.int32
    assert torch.equal(read_back(words, bits, path, n, k), values.to(torch.int64))


def test_each_lane_element_is_a_distinct_position():
    for path in ("float", "int8"):
        rows, cols, _ = layout._lane_element_map(path, 2)
        flat = (rows * 128 + cols).reshape(-1)
        assert flat.unique().numel() == 16 * 128


def test_xnor_bits_match_canonical_bytes():
    gen = torch.Generator().manual_seed(3)
    values = random_values(1, 5, 77, gen)
    packed = pack_weight(values, torch.tensor([1.0]), 1)
    bits = layout.xnor_bits(packed)
    words = bits.to(torch.int64) & 0xFFFFFFFF
    k = torch.arange(77)
    got = (words[:5, k // 32] >> (k % 32)) & 1
    assert torch.equal(got, (values > 0).to(torch.int64))
    tail = torch.arange(77, bits.shape[1] * 32)
    assert int(((words[:5, tail // 32] >> (tail % 32)) & 1).sum()) == 0, "padding bits must be 0"
    assert int(words[5:].abs().sum()) == 0, "padded rows must be 0"


@pytest.mark.parametrize("path", ["float", "int8"])
def test_ternary_padding_holds_the_documented_code(path):
    """int8-path ternary padding decodes to 0 (the MLP kernel's padded intermediate rows stay 0); the float
    path's padding holds code 0 (the value -1, harmless against zero-padded activations)."""
    gen = torch.Generator().manual_seed(11)
    n, k = 21, 200
    values = random_values(1.58, n, k, gen)
    full = read_back(layout.lane_tiles(pack_weight(values, torch.tensor([1.0]), 1.58), path), 1.58, path, n, k,
                     padded=True)
    pad_value = 0 if path == "int8" else -1
    assert torch.equal(full[:n, :k], values.to(torch.int64))
    assert bool((full[n:] == pad_value).all()) and bool((full[:, k:] == pad_value).all())


# ----------------------------------------------------------------------------- the int8 ternary decode's prmt
CUH = Path(__file__).resolve().parents[3] / "backends" / "cuda_ext" / "csrc" / "bitlab_mma.cuh"


def cuh_constant(name):
    match = re.search(rf"constexpr uint32_t {name} = (0x[0-9A-Fa-f]+)u;", CUH.read_text())
    assert match, f"{name} not found in {CUH}"
    return int(match.group(1), 16)


def prmt_generic(a, b, sel):
    """PTX prmt.b32 in its generic mode: result byte i from selector nibble i (bits 0-2 pick one of the
    8 bytes of {b, a}; bit 3 replicates the picked byte's sign bit over the byte)."""
    source = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = source[nib & 7]
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * i)
    return out


def decode_s8_ternary(word, s):
    """bitlab_mma.cuh's decode_s8<kTernary>, step by step: four int8 values of slot s of a word."""
    half = (word >> 16) if s >= 2 else word
    sel = half & (0xCCCC if s & 1 else 0x3333)
    d = prmt_generic(cuh_constant("kTernaryS8Lut"), cuh_constant("kTernaryS8High"), sel)
    return [((d >> (8 * e)) & 0xFF) - (256 if (d >> (8 * e)) & 0x80 else 0) for e in range(4)]


def test_int8_ternary_prmt_decode_reads_every_slot():
    """The lookup constants in the header, run through prmt's documented semantics, give each slot's values
    for every code the layout stores (including a code 3 nowhere: it is never stored)."""
    gen = torch.Generator().manual_seed(5)
    table = torch.tensor(layout.TERNARY_INT8_CODES[:3])  # codes of the values 0, +1, -1
    for _ in range(200):
        canon = torch.randint(3, (16,), generator=gen)  # 4 slots x 4 elements, canonical codes
        codes = table[canon]
        word = 0
        for s in range(4):
            for e in range(4):
                word |= int(codes[4 * s + e]) << (4 * e + 2 * (s & 1) + 16 * (s >> 1))
        want = torch.tensor([0, 1, -1])[canon].view(4, 4).tolist()
        assert [decode_s8_ternary(word, s) for s in range(4)] == want
