import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpack import pack_bits, unpack_bits


@given(
    bits=st.integers(1, 8),
    lead=st.lists(st.integers(0, 4), max_size=3),
    n=st.integers(0, 70),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=200, deadline=None)
def test_pack_unpack_round_trip(bits, lead, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, n), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, (n * bits + 7) // 8)
    assert torch.equal(unpack_bits(packed, bits, n).long(), codes)


def test_layout_is_lsb_first():
    # 4 bits: byte j = code[2j] | code[2j+1] << 4; 3 bits: code i at stream bits [3i, 3i+3)
    assert pack_bits(torch.tensor([1, 2, 15, 0]), 4).tolist() == [0x21, 0x0F]
    assert pack_bits(torch.tensor([7, 1, 2]), 3).tolist() == [0b10_001_111, 0b0]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 1]


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(8, dtype=torch.long), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_bits(torch.zeros(8, dtype=torch.uint8), bits, 8)


def test_bad_codes():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(torch.tensor([-1, 0]), 2)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.zeros(4), 2)
    with pytest.raises(TypeError, match="bits must be an int"):
        pack_bits(torch.zeros(4, dtype=torch.long), 2.0)


def test_unpack_wrong_length():
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 10)  # needs 4 bytes
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(torch.zeros(4, dtype=torch.int32), 3, 10)
