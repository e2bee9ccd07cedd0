"""Lane-tile layout (CPU): every weight lands exactly once, and the documented bit rules read it back."""
import pytest
import torch

from backends.cuda_ext import layout
from bitcore.packing import pack_weight

FORMATS = {1: (-1, 1), 1.58: (-1, 0, 1), 2: (-3, -1, 1, 3), 4: tuple(range(-8, 8)), 8: tuple(range(-128, 128))}


def random_values(bits, n, k, gen):
    choices = torch.tensor(FORMATS[bits], dtype=torch.int8)
    return choices[torch.randint(len(choices), (n, k), generator=gen)]


def code_to_value(code, bits, path):
    """The value each kernel decoder produces for a stored code (bitlab_mma.cuh)."""
    if bits == 1.58:
        return code - 1 if path == "float" else (code & 1) - (code >> 1)
    offset = {1: (2, -1), 2: (2, -3), 4: (1, -8), 8: (1, -128)}[bits]
    return offset[0] * code + offset[1]


def read_back(words, bits, path, n, k):
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
    return out[:n, :k]


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
