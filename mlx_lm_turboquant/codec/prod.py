"""TurboQuant_prod (arXiv 2504.19874, Algorithm 2) for keys: unbiased inner products.

x -> the (b-1)-bit MSE code of x -> residual r = R x - x_mse in the rotated basis ->
sign(S r) (one bit per coordinate, S a D x D standard Gaussian matrix) and ||r||. Then for
any query q, with q' = R q:

    <q, x>  ~  <q', x_mse> + ||r|| * sqrt(pi/2) / D * <S q', sign(S r)>

is unbiased over S (E[sign(<s, r>) <s, q'>] = sqrt(2/pi) <q', r> / ||r|| for s ~ N(0, I)),
with variance at most pi / (2 D) * ||q||^2 * ||r||^2 (the paper's Lemma 4). S acts on the
rotated residual: a Gaussian matrix's law does not change under rotation, so this is the
paper's estimator with S R in place of S, and attention needs the query rotated once and
sketched once, never a key.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np

from .codec import TurboQuantCodec
from .packing import pack, packed_words, unpack

QJL_SCALE = float(np.sqrt(np.pi / 2))


class ProdCodec:
    """Keys of length ``dim`` at ``bits`` bits per coordinate: ``bits - 1`` MSE bits plus one
    QJL sign bit, and two fp16 norms (the MSE scale and the residual's norm).

    Stored vector: ``[..., words]`` uint32 (MSE codes, then the sign bits) and ``[..., 2]``
    float16 norms.
    """

    plain = False  # the fused kernels do not read this format
    norms_per_vector = 2

    def __init__(self, dim: int, bits: int, seed: int, norm_correction: bool = True):
        if bits not in (2, 3, 4):
            raise ValueError(f"prod codec bits must be 2, 3 or 4 (QJL bit included), got {bits!r}")
        self.dim, self.bits, self.seed = dim, bits, seed
        self.norm_correction = norm_correction
        self.mse = TurboQuantCodec(dim, bits - 1, seed, norm_correction)
        self.rotation = self.mse.rotation
        # Its own stream, so S is independent of the rotation's signs.
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x51]))
        self.sketch = mx.array(rng.standard_normal((dim, dim)).astype(np.float32))
        self.sketch_t = mx.array(np.ascontiguousarray(np.array(self.sketch).T))
        self.mse_words = self.mse.words
        self.words = self.mse_words + packed_words(dim, 1)

    @property
    def bytes_per_vector(self) -> int:
        return 4 * self.words + 2 * self.norms_per_vector

    def encode(self, x: mx.array):
        """``(packed [..., words] uint32, norms [..., 2] float16)`` for ``x`` ``[..., dim]``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of length {self.dim}, got shape {x.shape}")
        x = x.astype(mx.float32)
        codes, scale = self.mse.encode(x)
        # The residual against what decoding will give (fp16 scale included), so the
        # estimate is unbiased for the stored data, not for an idealised one.
        residual = self.rotation.forward(x) - self.mse.decode_rotated(codes, scale)
        gamma = mx.sqrt((residual * residual).sum(axis=-1))
        signs = (residual @ self.sketch_t) >= 0
        packed = mx.concatenate([codes, pack(signs.astype(mx.uint32), 1)], axis=-1)
        norms = mx.stack([scale, mx.minimum(gamma, 65504.0).astype(mx.float16)], axis=-1)
        return packed, norms

    def signs(self, packed: mx.array) -> mx.array:
        """The QJL signs as float32 +-1, ``[..., dim]``."""
        bits = unpack(packed[..., self.mse_words :], 1, self.dim)
        return bits.astype(mx.float32) * 2 - 1

    def decode_mse_rotated(self, packed: mx.array, norms: mx.array) -> mx.array:
        """The MSE part alone, in the rotated basis: ``[..., dim]`` float32."""
        return self.mse.decode_rotated(packed[..., : self.mse_words], norms[..., 0])

    def sketch_queries(self, q_rotated: mx.array) -> mx.array:
        """``S q'`` for rotated queries ``[..., dim]``: once per query."""
        return q_rotated @ self.sketch_t

    def residual_weights(self, packed: mx.array, norms: mx.array) -> mx.array:
        """``||r|| sqrt(pi/2) / D * sign(S r)`` per key, ``[..., dim]``: scores add
        ``<S q', this>``."""
        gamma = norms[..., 1].astype(mx.float32) * (QJL_SCALE / self.dim)
        return self.signs(packed) * gamma[..., None]

    def decode_rotated(self, packed: mx.array, norms: mx.array, dtype=mx.float32) -> mx.array:
        """Algorithm 2's dequantized vector in the rotated basis: x_mse + (weights) S.
        Its inner products equal the estimator's; attention never builds it."""
        qjl = self.residual_weights(packed, norms) @ self.sketch
        return (self.decode_mse_rotated(packed, norms) + qjl).astype(dtype)

    def decode(self, packed: mx.array, norms: mx.array, dtype=mx.float32) -> mx.array:
        return self.rotation.inverse(self.decode_rotated(packed, norms)).astype(dtype)


@lru_cache(maxsize=None)
def get_prod_codec(dim: int, bits: int, seed: int, norm_correction: bool = True) -> ProdCodec:
    return ProdCodec(dim, bits, seed, norm_correction)
