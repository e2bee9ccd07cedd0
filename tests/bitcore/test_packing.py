import pytest
import torch

from bitcore.errors import PackingError
from bitcore.packing import (
    PackedWeight, codes_to_values, dequantize, pack_codes, pack_weight, row_bytes, unpack_codes, unpack_values,
    values_to_codes,
)

VALUE_SETS = {
    1: torch.tensor([-1, 1]),
    1.58: torch.tensor([-1, 0, 1]),
    2: torch.tensor([-3, -1, 1, 3]),
    4: torch.arange(-8, 8),
    8: torch.arange(-128, 128),
}


def random_values(bits, out_f, in_f, gen):
    choices = VALUE_SETS[bits]
    idx = torch.randint(0, len(choices), (out_f, in_f), generator=gen)
    return choices[idx].to(torch.int8)


@pytest.mark.parametrize("bits", [1, 1.58, 2, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33), (2, 129), (17, 4097)])
def test_pack_unpack_round_trip_exact(bits, shape):
    gen = torch.Generator().manual_seed(hash((bits, shape)) % 2**31)
    values = random_values(bits, *shape, gen)
    packed = pack_weight(values, torch.rand(1) + 0.1, bits)
    assert packed.data.dtype == torch.uint8
    assert packed.data.shape == (shape[0], row_bytes(shape[1], bits))
    assert torch.equal(unpack_values(packed), values)


@pytest.mark.parametrize("bits,per_byte", [(1, 8), (1.58, 4), (2, 4), (4, 2), (8, 1)])
def test_storage_is_true_bit_width(bits, per_byte):
    values = random_values(bits, 4, 64, torch.Generator().manual_seed(0))
    packed = pack_weight(values, torch.ones(1), bits)
    assert packed.data.numel() == 4 * 64 // per_byte


def test_documented_layout_little_endian_ternary():
    # row [+1, -1, 0, +1] -> codes [1, 2, 0, 1] -> byte 0b01_00_10_01
    values = torch.tensor([[1, -1, 0, 1]], dtype=torch.int8)
    packed = pack_weight(values, torch.ones(1), 1.58)
    assert packed.data.tolist() == [[0b01001001]]


def test_documented_layout_binary_and_int4():
    b = pack_weight(torch.tensor([[1, -1, -1, -1, -1, -1, -1, 1, 1]], dtype=torch.int8), torch.ones(1), 1)
    assert b.data.tolist() == [[0b10000001, 0b00000001]]
    q = pack_weight(torch.tensor([[-8, 7, 0]], dtype=torch.int8), torch.ones(1), 4)
    assert q.data.tolist() == [[0xF0, 0x08]]


def test_padding_bits_are_zero_and_in_features_remembered():
    values = torch.ones(2, 5, dtype=torch.int8)
    packed = pack_weight(values, torch.ones(1), 1.58)
    assert packed.in_features == 5
    assert all(row[1] == 0b01 for row in packed.data.tolist())  # only the 5th code set in byte 1


@pytest.mark.parametrize("bits,bad", [(1, 0), (1.58, 2), (2, 0), (2, 2), (4, 8), (8, -129)])
def test_out_of_range_values_rejected(bits, bad):
    values = torch.tensor([[bad]], dtype=torch.int16)
    with pytest.raises(PackingError):
        values_to_codes(values, bits)


def test_invalid_ternary_code_rejected():
    with pytest.raises(PackingError, match="code 3"):
        codes_to_values(torch.tensor([[3]], dtype=torch.uint8), 1.58)


def test_packed_weight_validates_shapes():
    with pytest.raises(PackingError, match="expected"):
        PackedWeight(torch.zeros(3, 2, dtype=torch.uint8), torch.ones(1), 1.58, in_features=16, out_features=3)
    with pytest.raises(PackingError, match="scale shape"):
        PackedWeight(torch.zeros(3, 4, dtype=torch.uint8), torch.ones(2), 1.58, 16, 3, "per_channel")


def test_pack_codes_unpack_codes_inverse():
    gen = torch.Generator().manual_seed(1)
    for bits in (1, 2, 4, 8):
        codes = torch.randint(0, 2**bits, (3, 29), generator=gen).to(torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 29), codes)


def test_dequantize_per_group_uses_group_scales():
    values = torch.tensor([[1, 1, 1, 1, 1]], dtype=torch.int8)
    scale = torch.tensor([[2.0, 3.0, 5.0]])
    packed = pack_weight(values, scale, 1.58, "per_group", group_size=2)
    assert dequantize(packed).tolist() == [[2.0, 2.0, 3.0, 3.0, 5.0]]
