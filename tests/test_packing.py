"""Bit packing: exact round trips, exact sizes, and a pinned byte layout."""

import pytest
import torch

from moepress.quantize import pack_bits, packed_width, unpack_bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 5, 8, 9, 16, 63, 64, 100])
def test_round_trip_random_codes(bits, n):
    g = torch.Generator().manual_seed(1000 * bits + n)
    codes = torch.randint(0, 2**bits, (3, 4, n), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    # every weight costs exactly `bits` bits: ceil(n/8) words of `bits` bytes
    assert packed.shape == (3, 4, -(-n // 8) * bits) == (3, 4, packed_width(n, bits))
    out = unpack_bits(packed, bits, n)
    assert out.dtype == torch.uint8 and out.shape == codes.shape
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_extreme_codes_round_trip(bits):
    # all-max codes exercise every bit of every byte
    for fill in (0, 2**bits - 1):
        codes = torch.full((2, 17), fill, dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(codes, bits), bits, 17), codes)


def test_eight_bits_is_identity_up_to_padding():
    codes = torch.randint(0, 256, (4, 16), dtype=torch.uint8)
    assert torch.equal(pack_bits(codes, 8), codes)
    packed = pack_bits(codes[:, :13], 8)
    assert torch.equal(packed[:, :13], codes[:, :13]) and (packed[:, 13:] == 0).all()


def test_layout_is_little_endian_fields():
    # 8 codes c_k form the word sum c_k << (3k), stored as 3 little-endian bytes
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(int(c) << (3 * k) for k, c in enumerate(codes[0]))
    expected = [(word >> (8 * b)) & 0xFF for b in range(3)]
    assert pack_bits(codes, 3)[0].tolist() == expected
    # 4-bit: two codes per byte, low nibble first
    assert pack_bits(torch.tensor([[1, 2] + [0] * 6], dtype=torch.uint8), 4)[0].tolist() == [0x21, 0, 0, 0]


def test_padding_codes_are_zero_and_dropped():
    codes = torch.full((1, 3), 3, dtype=torch.uint8)
    packed = pack_bits(codes, 2)
    assert packed.shape == (1, 2)
    assert packed[0].tolist() == [0b00111111, 0]
    assert unpack_bits(packed, 2, 3).shape == (1, 3)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="fit in 2 bits"):
        pack_bits(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="uint8"):
        pack_bits(torch.tensor([[1]], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_bits(torch.tensor([[1]], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="need 6"):
        unpack_bits(torch.zeros(2, 5, dtype=torch.uint8), 3, 16)
