"""Random orthogonal rotations that spread a vector's energy over all coordinates.

After a uniform random rotation every coordinate of a unit vector follows the same
Beta law (arXiv 2504.19874, Lemma 1), which is what makes one fixed scalar codebook
near-optimal. We use a randomized Hadamard transform where ``mx.hadamard_transform``
supports the size (O(D log D)) and a dense Haar rotation (QR of a Gaussian) elsewhere.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np


# mlx implements Hadamard transforms of size m * 2**k for these m only. Other sizes
# are not rejected: mlx 0.32.4 returns garbage and corrupts the heap, so never call it.
_HADAMARD_BASES = (1, 12, 20, 28)


def hadamard_supported(dim: int) -> bool:
    for m in _HADAMARD_BASES:
        if dim % m == 0:
            k = dim // m
            if k & (k - 1) == 0 and (m > 1 or k > 1):
                return True
    return False


@lru_cache(maxsize=None)  # per size: every layer's keys and values share it
def _hadamard_matrix(dim: int):
    """The orthonormal matrix that ``mx.hadamard_transform`` applies (read-only), or None
    where mlx has no transform of this size."""
    if not hadamard_supported(dim):
        return None
    m = np.array(mx.hadamard_transform(mx.eye(dim), scale=dim**-0.5), dtype=np.float64)
    if not np.allclose(m @ m.T, np.eye(dim), atol=1e-4):
        return None
    m = m.astype(np.float32)
    m.setflags(write=False)
    return m


@lru_cache(maxsize=None)
def _is_sylvester(dim: int) -> bool:
    """Whether mlx's Hadamard matrix of this size has the signs (-1)^popcount(i & j)."""
    hadamard = _hadamard_matrix(dim)
    if hadamard is None:
        return False
    i = np.arange(dim)
    bits, parity = i[:, None] & i[None, :], np.zeros((dim, dim), np.int64)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return bool(np.array_equal(np.sign(hadamard), 1.0 - 2.0 * parity))


class Rotation:
    """An orthogonal map of R^dim, applied to the last axis of row vectors.

    ``forward(x)`` is ``x @ matrix`` and ``inverse(y)`` is ``y @ matrix.T``.
    Signs / the Haar matrix come from numpy's PCG64 seeded with ``seed``, so the
    rotation is the same on every platform and backend. Where ``sylvester`` is true the
    matrix is ``diag(signs) @ H / sqrt(dim)`` with ``H[i, j] = (-1)^popcount(i & j)``, so a
    kernel can apply it as a fast Walsh-Hadamard transform from the ``signs`` alone.
    """

    def __init__(self, dim: int, seed: int):
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"rotation dim must be an int >= 2, got {dim!r}")
        self.dim = dim
        self.seed = seed
        rng = np.random.default_rng(seed)
        hadamard = _hadamard_matrix(dim)
        if hadamard is not None:
            self.kind = "hadamard"
            signs = rng.choice(np.array([-1.0, 1.0], np.float32), size=dim)
            self.signs = mx.array(signs)
            matrix = signs[:, None] * hadamard
            self._symmetric = bool(np.allclose(hadamard, hadamard.T))
            self.sylvester = _is_sylvester(dim)
        else:
            self.kind = "haar"
            self.signs, self.sylvester = None, False
            g = rng.standard_normal((dim, dim))
            q, r = np.linalg.qr(g)
            # Sign fix makes Q Haar-distributed rather than biased by QR's convention.
            matrix = (q * np.sign(np.diag(r))[None, :]).astype(np.float32)
        self.matrix = mx.array(matrix)
        self.matrix_t = mx.array(np.ascontiguousarray(matrix.T))

    def forward(self, x: mx.array) -> mx.array:
        """Rotate ``x`` of shape ``[..., dim]`` (any float dtype)."""
        if self.kind == "hadamard":
            return mx.hadamard_transform(x * self.signs.astype(x.dtype), scale=self.dim**-0.5)
        return x @ self.matrix.astype(x.dtype)

    def inverse(self, y: mx.array) -> mx.array:
        """Undo ``forward`` for ``y`` of shape ``[..., dim]``."""
        if self.kind == "hadamard" and self._symmetric:
            return mx.hadamard_transform(y, scale=self.dim**-0.5) * self.signs.astype(y.dtype)
        return y @ self.matrix_t.astype(y.dtype)


@lru_cache(maxsize=None)
def get_rotation(dim: int, seed: int) -> Rotation:
    return Rotation(dim, seed)
