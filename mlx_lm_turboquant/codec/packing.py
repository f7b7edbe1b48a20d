"""Dense bit-packing of small integer codes into uint32 words.

``count`` codes of ``bits`` bits occupy exactly ceil(count * bits / 32) words: code j
starts at bit j * bits of the stream (little-endian within each word) and may straddle
two words (3 bits cost 3 bits). The word layout is computed once per (count, bits) as
gather tables, so packing is a handful of vectorized ops with no Python loop over codes.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np

PACKABLE_BITS = (1, 2, 3, 4, 8)


def packed_words(count: int, bits: int) -> int:
    """Number of uint32 words that ``count`` codes of ``bits`` bits occupy."""
    return (count * bits + 31) // 32


def _check(count: int, bits: int):
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits!r}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")


@lru_cache(maxsize=None)
def _pack_tables(count: int, bits: int):
    """For each word: which codes touch it and how far each is shifted.

    A positive shift moves a code left into the word; a negative one takes the
    high part of a code that started in the previous word.
    """
    words = packed_words(count, bits)
    per_word = 32 // bits + 2
    index = np.zeros((words, per_word), np.uint32)
    left = np.zeros((words, per_word), np.uint32)
    right = np.zeros((words, per_word), np.uint32)
    valid = np.zeros((words, per_word), np.uint32)
    fill = np.zeros(words, np.int64)
    for j in range(count):
        start = j * bits
        w, s = divmod(start, 32)
        k = fill[w]
        index[w, k], left[w, k], valid[w, k] = j, s, 1
        fill[w] += 1
        if s + bits > 32:
            k = fill[w + 1]
            index[w + 1, k], right[w + 1, k], valid[w + 1, k] = j, 32 - s, 1
            fill[w + 1] += 1
    used = int(fill.max())
    return tuple(mx.array(t[:, :used]) for t in (index, left, right, valid))


@lru_cache(maxsize=None)
def _unpack_tables(count: int, bits: int):
    starts = np.arange(count) * bits
    word, shift = np.divmod(starts, 32)
    spill = shift + bits > 32
    next_word = np.minimum(word + 1, packed_words(count, bits) - 1)
    # Shifting a uint32 by 32 is undefined, so spill-free codes use shift 0 and mask 0.
    high_shift = np.where(spill, 32 - shift, 0)
    high_mask = np.where(spill, 0xFFFFFFFF, 0)
    return (
        mx.array(word.astype(np.uint32)),
        mx.array(shift.astype(np.uint32)),
        mx.array(next_word.astype(np.uint32)),
        mx.array(high_shift.astype(np.uint32)),
        mx.array(high_mask.astype(np.uint32)),
    )


def pack(codes: mx.array, bits: int) -> mx.array:
    """Pack ``codes`` of shape ``[..., count]`` (ints in [0, 2**bits)) into
    ``[..., packed_words(count, bits)]`` uint32."""
    count = codes.shape[-1]
    _check(count, bits)
    index, left, right, valid = _pack_tables(count, bits)
    c = codes.astype(mx.uint32)[..., index]  # [..., words, used]
    parts = mx.left_shift(c, left) * valid
    parts = mx.where(right > 0, mx.right_shift(c, right), parts)
    # The parts occupy disjoint bits of their word, so a sum is a bitwise OR.
    return parts.sum(axis=-1).astype(mx.uint32)


def unpack(words: mx.array, bits: int, count: int) -> mx.array:
    """Inverse of :func:`pack`: ``[..., packed_words(count, bits)]`` uint32 to
    ``[..., count]`` uint32 codes."""
    _check(count, bits)
    if words.shape[-1] != packed_words(count, bits):
        raise ValueError(
            f"expected {packed_words(count, bits)} words for {count} codes of {bits} bits, "
            f"got {words.shape[-1]}"
        )
    word, shift, next_word, high_shift, high_mask = _unpack_tables(count, bits)
    low = mx.right_shift(words[..., word], shift)
    high = mx.left_shift(words[..., next_word], high_shift) & high_mask
    return (low | high) & ((1 << bits) - 1)


def token_rows(keys, key_norms, values, value_norms) -> mx.array:
    """One uint32 row per token: key codes, value codes, then one word holding both fp16
    norms (the key's in the low half). ``keys`` / ``values`` ``[..., words]`` uint32,
    norms ``[...]`` float16. Same bytes as the four arrays, one array to update."""
    key_half = key_norms.view(mx.uint16).astype(mx.uint32)
    value_half = value_norms.view(mx.uint16).astype(mx.uint32)
    norms = key_half | mx.left_shift(value_half, 16)
    return mx.concatenate([keys, values, norms[..., None]], axis=-1)


def split_rows(rows, key_words: int):
    """Inverse of :func:`token_rows`: ``(keys, key_norms, values, value_norms)``."""
    norms = rows[..., -1]
    as_half = lambda bits: (bits & 0xFFFF).astype(mx.uint16).view(mx.float16)  # noqa: E731
    return (rows[..., :key_words], as_half(norms), rows[..., key_words:-1],
            as_half(mx.right_shift(norms, 16)))  # fmt: skip
