"""TurboQuant_mse (arXiv 2504.19874, Algorithm 1) over mx.array.

x -> n = ||x|| (fp32) -> u = x / n -> y = R u -> per-coordinate Lloyd-Max code ->
codes packed into uint32. Norm correction stores n / ||c(y)|| instead of n, so the
dequantized vector keeps the true length of x (``c(y)`` is the centroid vector).
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np

from .codebook import get_codebook
from .packing import pack, packed_words, unpack
from .rotation import get_rotation


class TurboQuantCodec:
    """Compress vectors of length ``dim`` to ``bits`` bits per coordinate plus an fp16 norm.

    Args:
        dim: vector length (a head_dim).
        bits: 1, 2, 3, 4 or 8 bits per coordinate.
        seed: seeds the rotation; different per layer and between keys and values.
        norm_correction: store ``||x|| / ||centroids||`` so decoded vectors keep their length.
    """

    plain = True  # the format the fused kernels read: one code per coordinate, one norm
    norms_per_vector = 1

    def __init__(self, dim: int, bits: int, seed: int, norm_correction: bool = True):
        self.dim = dim
        self.bits = bits
        self.seed = seed
        self.norm_correction = norm_correction
        self.codebook = get_codebook(dim, bits)
        self.rotation = get_rotation(dim, seed)
        self.centroids = mx.array(self.codebook.centroids.astype(np.float32))
        self.boundaries = mx.array(self.codebook.boundaries.astype(np.float32))
        self.words = packed_words(dim, bits)

    @property
    def bytes_per_vector(self) -> int:
        return 4 * self.words + 2

    def quantize_rotated(self, y: mx.array) -> mx.array:
        """Codes (uint32) of rotated unit vectors ``y`` of shape ``[..., dim]``.

        Binary search over the sorted boundaries: ``bits`` comparisons per
        coordinate instead of 2**bits.
        """
        codes = mx.zeros(y.shape, mx.uint32)
        for bit in reversed(range(self.bits)):
            candidate = codes + (1 << bit)
            above = y >= self.boundaries[candidate - 1]
            codes = mx.where(above, candidate, codes)
        return codes

    def encode(self, x: mx.array):
        """Compress ``x`` of shape ``[..., dim]``.

        Returns ``(packed, norms)``: ``packed`` is ``[..., words]`` uint32 and ``norms``
        is ``[...]`` float16 (the scale to apply to the centroid vector).
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of length {self.dim}, got shape {x.shape}")
        x = x.astype(mx.float32)
        norms = mx.sqrt((x * x).sum(axis=-1, keepdims=True))
        unit = x / mx.maximum(norms, 1e-30)
        codes = self.quantize_rotated(self.rotation.forward(unit))
        if self.norm_correction:
            c = self.centroids[codes]
            c_norm = mx.sqrt((c * c).sum(axis=-1, keepdims=True))
            norms = norms / mx.maximum(c_norm, 1e-30)
        # fp16 overflows above 65504: clamp rather than store inf (keys of a few
        # models reach norms in the hundreds, far below this).
        norms = mx.minimum(norms, 65504.0)
        return pack(codes, self.bits), norms.squeeze(-1).astype(mx.float16)

    def codes(self, packed: mx.array) -> mx.array:
        return unpack(packed, self.bits, self.dim)

    def decode_rotated(self, packed: mx.array, norms: mx.array, dtype=mx.float32) -> mx.array:
        """Decoded vectors in the rotated basis, ``[..., dim]``: what attention uses."""
        values = self.centroids[self.codes(packed)]
        return (values * norms.astype(mx.float32)[..., None]).astype(dtype)

    def decode(self, packed: mx.array, norms: mx.array, dtype=mx.float32) -> mx.array:
        """Decoded vectors in the original basis, ``[..., dim]``."""
        return self.rotation.inverse(self.decode_rotated(packed, norms)).astype(dtype)


@lru_cache(maxsize=None)
def get_codec(dim: int, bits: int, seed: int, norm_correction: bool = True) -> TurboQuantCodec:
    return TurboQuantCodec(dim, bits, seed, norm_correction)
