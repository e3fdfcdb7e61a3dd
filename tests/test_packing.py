import pytest
import torch

from lqkit.core import packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_pack_unpack_identity(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packing.packed_nbytes(n, bits)
    assert torch.equal(packing.unpack(packed, bits, n).long(), codes)


def test_dense_sizes():
    # 3-bit codes are packed densely: 8 codes in 3 bytes, not one byte per code
    assert packing.packed_nbytes(8000, 3) == 3000
    assert packing.packed_nbytes(8000, 2) == 2000
    assert packing.packed_nbytes(8000, 4) == 4000
    assert packing.packed_nbytes(8000, 8) == 8000
    assert packing.packed_nbytes(9, 3) == 6  # last chunk padded


def test_bit_layout_is_little_endian_within_chunk():
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])  # 3-bit
    word = sum(int(c) << (3 * j) for j, c in enumerate(codes))
    expect = [(word >> (8 * k)) & 0xFF for k in range(3)]
    assert packing.pack(codes, 3).tolist() == expect


@pytest.mark.parametrize("bad", [0, 9, 2.0])
def test_bad_bits(bad):
    with pytest.raises(ValueError):
        packing.pack(torch.zeros(8, dtype=torch.long), bad)


def test_wrong_buffer_size():
    with pytest.raises(ValueError, match="expected"):
        packing.unpack(torch.zeros(5, dtype=torch.uint8), 3, 16)
