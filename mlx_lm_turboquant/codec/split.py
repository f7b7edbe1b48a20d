"""The paper's outlier-channel split (arXiv 2504.19874, section 4.3) for 2.5 and 3.5 bits.

A head's D channels are split, in the model's own basis (after a rotation every coordinate
has the same law, so "outlier channels" only exist before it), into the ceil(D/2) channels
of largest mean magnitude, coded at b+1 bits, and the rest at b bits: two independent
TurboQuant codecs, each with its own rotation, codebook of its own dimension, and norm.
For even D that is exactly b + 0.5 bits per coordinate plus two fp16 norms.

The codec works on channel-permuted vectors (outliers first); which channels are outliers
is data, chosen per layer, sequence and KV head by :func:`outlier_channels` and kept by the
cache, which permutes on the way in and back on the way out.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np

from ..config import split_dims
from .codec import TurboQuantCodec


class BlockRotation:
    """The block-diagonal rotation ``diag(R_hi, R_lo)`` of a channel-permuted vector."""

    def __init__(self, hi, lo):
        self.hi, self.lo = hi, lo
        self.dim = hi.dim + lo.dim

    def forward(self, x):
        return mx.concatenate([self.hi.forward(x[..., : self.hi.dim]),
                               self.lo.forward(x[..., self.hi.dim :])], axis=-1)  # fmt: skip

    def inverse(self, y):
        return mx.concatenate([self.hi.inverse(y[..., : self.hi.dim]),
                               self.lo.inverse(y[..., self.hi.dim :])], axis=-1)  # fmt: skip


class SplitCodec:
    """Channel-permuted vectors of length ``dim`` (outliers first): the first
    ``ceil(dim/2)`` channels at ``bits + 1`` bits, the rest at ``bits``.

    Stored vector: ``[..., words]`` uint32 (the outliers' codes, then the rest's) and
    ``[..., 2]`` float16 norms (one per half).
    """

    plain = False  # the fused kernels do not read this format
    norms_per_vector = 2

    def __init__(self, dim: int, bits: int, seed: int, norm_correction: bool = True):
        if bits not in (2, 3):
            raise ValueError(f"split codec bits must be 2 or 3, got {bits!r}")
        n_hi, n_lo = split_dims(dim)
        if n_lo < 3:
            raise ValueError(f"a split codec needs dim >= 6, got {dim!r}")
        self.dim, self.bits, self.seed = dim, bits, seed
        self.norm_correction = norm_correction
        seeds = np.random.SeedSequence([seed, 0x5B]).generate_state(2)
        self.hi = TurboQuantCodec(n_hi, bits + 1, int(seeds[0]), norm_correction)
        self.lo = TurboQuantCodec(n_lo, bits, int(seeds[1]), norm_correction)
        self.rotation = BlockRotation(self.hi.rotation, self.lo.rotation)
        self.words = self.hi.words + self.lo.words

    @property
    def bytes_per_vector(self) -> int:
        return 4 * self.words + 2 * self.norms_per_vector

    def encode(self, x: mx.array):
        """``(packed [..., words] uint32, norms [..., 2] float16)`` for permuted ``x``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of length {self.dim}, got shape {x.shape}")
        hi_codes, hi_norms = self.hi.encode(x[..., : self.hi.dim])
        lo_codes, lo_norms = self.lo.encode(x[..., self.hi.dim :])
        return (mx.concatenate([hi_codes, lo_codes], axis=-1),
                mx.stack([hi_norms, lo_norms], axis=-1))  # fmt: skip

    def decode_rotated(self, packed: mx.array, norms: mx.array, dtype=mx.float32) -> mx.array:
        """Both halves in their rotated bases, concatenated: ``[..., dim]``."""
        hi = self.hi.decode_rotated(packed[..., : self.hi.words], norms[..., 0])
        lo = self.lo.decode_rotated(packed[..., self.hi.words :], norms[..., 1])
        return mx.concatenate([hi, lo], axis=-1).astype(dtype)

    def decode(self, packed: mx.array, norms: mx.array, dtype=mx.float32) -> mx.array:
        """Decoded vectors in the permuted channel order."""
        return self.rotation.inverse(self.decode_rotated(packed, norms)).astype(dtype)


def outlier_channels(x: mx.array, weights=None) -> mx.array:
    """Channel order per row and head, outliers first: ``[B, H, D]`` int32.

    Outliers are the ``ceil(D/2)`` channels of largest mean |x| over the tokens of ``x``
    ``[B, H, L, D]`` (as QJL picks key outliers during prompt encoding). ``weights``
    ``[B, L]`` (1 = a real token, 0 = padding) keeps padding out of the mean. Within each
    half channels stay in ascending order, so the choice is a set, not a ranking.
    """
    magnitude = mx.abs(x.astype(mx.float32))
    if weights is None:
        mean = magnitude.mean(axis=2)
    else:
        w = weights.astype(mx.float32)[:, None, :, None]
        mean = (magnitude * w).sum(axis=2) / mx.maximum(w.sum(axis=2), 1.0)
    n_hi = split_dims(x.shape[-1])[0]
    order = np.argsort(-np.array(mean), axis=-1, kind="stable")
    hi, lo = np.sort(order[..., :n_hi], axis=-1), np.sort(order[..., n_hi:], axis=-1)
    return mx.array(np.concatenate([hi, lo], axis=-1).astype(np.int32))


def identity_channels(B: int, H: int, D: int) -> mx.array:
    """The order of a row that had no tokens to choose from: channels as they are."""
    return mx.broadcast_to(mx.arange(D, dtype=mx.int32), (B, H, D))


def inverse_order(channels: mx.array) -> mx.array:
    """``inv`` with ``x_perm[..., inv] == x`` for ``x_perm = x[..., channels]``."""
    return mx.argsort(channels, axis=-1).astype(mx.int32)


def permute(x: mx.array, channels: mx.array) -> mx.array:
    """``x`` ``[B, H, ..., D]`` gathered along D by ``channels`` ``[B, H, D]``."""
    c = channels.reshape(*channels.shape[:2], *([1] * (x.ndim - 3)), channels.shape[-1])
    return mx.take_along_axis(x, c, axis=-1)


@lru_cache(maxsize=None)
def get_split_codec(dim: int, bits: int, seed: int, norm_correction: bool = True) -> SplitCodec:
    return SplitCodec(dim, bits, seed, norm_correction)
