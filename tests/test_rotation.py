import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_turboquant.codec.rotation import Rotation

DIMS = (64, 72, 80, 96, 112, 128, 160, 192, 256)


@pytest.mark.parametrize("dim", DIMS)
def test_orthonormal_and_invertible(dim):
    rot = Rotation(dim, seed=7)
    m = np.array(rot.matrix, dtype=np.float64)
    np.testing.assert_allclose(m @ m.T, np.eye(dim), atol=1e-5)
    x = mx.random.normal((5, 3, dim), key=mx.random.key(dim))
    y = rot.forward(x)
    np.testing.assert_allclose(np.array(y), np.array(x) @ m, atol=1e-4)
    np.testing.assert_allclose(np.array(rot.inverse(y)), np.array(x), atol=1e-4)
    np.testing.assert_allclose(
        np.linalg.norm(np.array(y), axis=-1), np.linalg.norm(np.array(x), axis=-1), rtol=1e-5
    )


def test_hadamard_where_mlx_supports_it():
    assert Rotation(128, 0).kind == "hadamard"
    assert Rotation(96, 0).kind == "hadamard"
    # mlx returns a non-orthogonal result for 72 = 9 * 8 instead of raising.
    assert Rotation(72, 0).kind == "haar"


@pytest.mark.parametrize("dim, sylvester", [(64, True), (128, True), (96, False), (72, False)])
def test_sylvester_rotations_are_signs_times_a_walsh_hadamard_matrix(dim, sylvester):
    # What the tensor-core kernel relies on: matrix = diag(signs) @ H / sqrt(dim), with H
    # built here from its definition, never from mlx.
    r = Rotation(dim, 3)
    assert r.sylvester == sylvester
    if not sylvester:
        return
    i = np.arange(dim)
    h = np.array([[(-1.0) ** bin(a & b).count("1") for b in i] for a in i])
    expected = np.array(r.signs)[:, None] * h / np.sqrt(dim)
    np.testing.assert_allclose(np.array(r.matrix), expected, atol=1e-6)


def test_seeds_give_different_rotations_and_are_reproducible():
    a, b, c = Rotation(128, 1), Rotation(128, 2), Rotation(128, 1)
    assert not np.allclose(np.array(a.matrix), np.array(b.matrix))
    np.testing.assert_array_equal(np.array(a.matrix), np.array(c.matrix))


def test_bad_dim():
    with pytest.raises(ValueError, match="dim must be"):
        Rotation(1, 0)
