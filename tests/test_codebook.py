import numpy as np
import pytest

from mlx_lm_turboquant.codec.codebook import SUPPORTED_BITS, _solve, get_codebook

DIMS = (64, 80, 96, 128, 256)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_sorted_symmetric_and_inside_the_law(dim, bits):
    cb = get_codebook(dim, bits)
    c = cb.centroids
    assert len(c) == 2**bits and len(cb.boundaries) == 2**bits - 1
    assert np.all(np.diff(c) > 0)
    np.testing.assert_allclose(c, -c[::-1], atol=1e-12)
    np.testing.assert_allclose(cb.boundaries, 0.5 * (c[1:] + c[:-1]))
    assert np.abs(c).max() < 1.0


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_deterministic(bits):
    a, _, da = _solve(128, bits)
    b, _, db = _solve(128, bits)
    np.testing.assert_array_equal(a, b)
    assert da == db


def test_matches_known_lloyd_max_values():
    # Gaussian-limit Lloyd-Max levels scaled by 1/sqrt(D) are close to, but slightly
    # wider than, the exact Beta-law levels at D=128 (outermost 4-bit: 2.733 vs ~2.69).
    one_bit = get_codebook(128, 1).centroids * np.sqrt(128)
    np.testing.assert_allclose(one_bit, [-np.sqrt(2 / np.pi), np.sqrt(2 / np.pi)], rtol=5e-3)
    two_bit = get_codebook(128, 2).centroids * np.sqrt(128)
    np.testing.assert_allclose(two_bit[2:], [0.453, 1.51], rtol=5e-3)
    four_bit = get_codebook(128, 4).centroids * np.sqrt(128)
    assert 2.6 < four_bit[-1] < 2.7326


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be one of"):
        get_codebook(128, 5)
    with pytest.raises(ValueError, match="dim must be"):
        get_codebook(2, 4)
