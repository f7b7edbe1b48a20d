import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_lm_turboquant.codec.packing import PACKABLE_BITS, pack, packed_words, unpack


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(PACKABLE_BITS),
    count=st.integers(1, 300),
    rows=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_round_trip_is_exact(bits, count, rows, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, count), dtype=np.uint32)
    words = pack(mx.array(codes), bits)
    assert words.dtype == mx.uint32
    assert words.shape == (rows, packed_words(count, bits))
    np.testing.assert_array_equal(np.array(unpack(words, bits, count)), codes)


@pytest.mark.parametrize("count", [70, 128])  # gather tables; groups of 32 codes
@pytest.mark.parametrize("bits", PACKABLE_BITS)
def test_dense_layout(bits, count):
    # 3 bits cost 3 bits: 128 codes take exactly 128 * bits / 32 words.
    assert packed_words(128, bits) == 4 * bits
    # Code j sits at bit j * bits of the little-endian stream.
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=count, dtype=np.uint64)
    stream = sum(int(c) << (j * bits) for j, c in enumerate(codes))
    words = np.array(pack(mx.array(codes.astype(np.uint32)), bits)).astype(np.uint64)
    assert sum(int(w) << (32 * i) for i, w in enumerate(words)) == stream


def test_all_ones_do_not_overflow():
    for bits in PACKABLE_BITS:
        for count in (97, 96):
            codes = mx.full((3, count), 2**bits - 1, dtype=mx.uint32)
            back = unpack(pack(codes, bits), bits, count)
            np.testing.assert_array_equal(np.array(back), np.array(codes))


@pytest.mark.parametrize("bits", PACKABLE_BITS)
def test_both_paths_write_and_read_the_same_words(bits):
    """Counts that are multiples of 32 take the elementwise group path; its words must be
    those of the gather tables, code for code, and each path must read the other's."""
    from mlx_lm_turboquant.codec import packing

    for count in (32, 64, 96, 128, 256):
        codes = mx.array(np.random.default_rng(count + bits).integers(
            0, 2**bits, size=(2, 3, count), dtype=np.uint32))  # fmt: skip
        by_tables = packing._pack_by_tables(codes, bits, count)
        assert mx.array_equal(pack(codes, bits), by_tables), (bits, count)
        assert mx.array_equal(packing._unpack_by_tables(by_tables, bits, count), codes), bits
        assert mx.array_equal(unpack(by_tables, bits, count), codes), (bits, count)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(mx.zeros((4,), mx.uint32), 5)
    with pytest.raises(ValueError, match="expected 2 words"):
        unpack(mx.zeros((3,), mx.uint32), 4, 16)
