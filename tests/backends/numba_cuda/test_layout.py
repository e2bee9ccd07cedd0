"""The numba_cuda weight layouts decode back to the packed values (plain torch; numba not needed)."""
import os

import pytest
import torch

from backends.numba_cuda.layout import (
    LANES,
    chunk_inputs,
    codes_per_word,
    interleave_sign_codes,
    sign_code_bits,
    weight_sign_words,
)
from bitcore.errors import PackingError
from bitcore.packing import pack_weight


def random_values(bits, out_f, in_f, gen):
    choices = torch.tensor([-1, 1] if bits == 1 else [-1, 0, 1], dtype=torch.int8)
    return choices[torch.randint(0, len(choices), (out_f, in_f), generator=gen)]


def decode_sign_codes(words, bits, in_f):
    """Read the layout the way the kernels do: code j of lane l of chunk c is input c*chunk + j*32 + l."""
    n = words.shape[0]
    per_word = codes_per_word(bits)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [n, chunks*32, j]
    codes = codes.view(n, -1, LANES, per_word).transpose(2, 3).reshape(n, -1)[:, :in_f]
    if bits == 2:
        return (codes & 1) - (codes & 2)  # bit 0: nonzero, bit 1: negative
    return 1 - 2 * codes  # 1 means -1


@pytest.mark.parametrize("bits", [1.58, 1])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (3, 1024), (5, 2049), (2, 4100)])
def test_sign_codes_decode_to_the_values(bits, shape):
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    values = random_values(bits, *shape, gen)
    packed = pack_weight(values, torch.ones(1), bits, "per_tensor")
    words = interleave_sign_codes(packed)
    code_bits = sign_code_bits(bits)
    assert words.dtype == torch.int64
    assert words.shape == (shape[0], -(-shape[1] // chunk_inputs(code_bits)) * LANES)
    assert torch.equal(decode_sign_codes(words, code_bits, shape[1]), values.long())


def test_sign_code_padding_is_zero():
    values = torch.ones(2, 5, dtype=torch.int8)
    words = interleave_sign_codes(pack_weight(values, torch.ones(1), 1.58, "per_tensor"))
    decoded = decode_sign_codes(words, 2, chunk_inputs(2))
    assert torch.equal(decoded[:, 5:], torch.zeros_like(decoded[:, 5:]))


@pytest.mark.parametrize("in_f", [1, 63, 64, 65, 200])
def test_sign_words_hold_the_canonical_bits(in_f):
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    values = random_values(1, 3, in_f, gen)
    words = weight_sign_words(pack_weight(values, torch.ones(1), 1, "per_tensor"))
    assert words.shape == (3, -(-in_f // 64))
    bits = ((words.unsqueeze(-1) >> torch.arange(64)) & 1).reshape(3, -1)
    assert torch.equal(bits[:, :in_f], (values > 0).long())
    assert int(bits[:, in_f:].sum()) == 0  # padding never differs from the (zero) activation padding


def test_layouts_refuse_other_widths():
    packed = pack_weight(torch.ones(2, 3, dtype=torch.int8), torch.ones(1), 4, "per_tensor")
    with pytest.raises(PackingError, match="weight_bits=4"):
        interleave_sign_codes(packed)
    with pytest.raises(PackingError, match="binary"):
        weight_sign_words(packed)
