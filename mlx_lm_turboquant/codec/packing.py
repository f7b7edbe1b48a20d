"""Dense bit-packing of small integer codes into uint32 words.

``count`` codes of ``bits`` bits occupy exactly ceil(count * bits / 32) words: code j
starts at bit j * bits of the stream (little-endian within each word) and may straddle
two words (3 bits cost 3 bits). When ``count`` is a multiple of 32 (every head dim the
kernels take), ``bits`` words hold exactly 32 codes and both directions are shifts and
masks broadcast over those groups; other counts use gather tables computed once per
(count, bits). Either way: a handful of vectorized ops, no Python loop over codes.
"""

from functools import lru_cache
from typing import NamedTuple

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
    if count % 32 == 0:
        return _pack_groups(codes, bits, count)
    return _pack_by_tables(codes, bits, count)


def _pack_by_tables(codes: mx.array, bits: int, count: int) -> mx.array:
    """:func:`pack` for any count: each word gathers the codes that touch it."""
    index, left, right, valid = _pack_tables(count, bits)
    c = codes.astype(mx.uint32)[..., index]  # [..., words, used]
    parts = mx.left_shift(c, left) * valid
    parts = mx.where(right > 0, mx.right_shift(c, right), parts)
    # The parts occupy disjoint bits of their word, so a sum is a bitwise OR.
    return parts.sum(axis=-1).astype(mx.uint32)


class _GroupWord(NamedTuple):
    """The codes of a 32-code group that start in one of its words."""

    first: int  # index of the first such code in the group
    shift: mx.array  # each code's bit offset in the word
    high_shift: mx.array  # left shift of the next word's bits into a code running on (or 0)
    high_mask: mx.array  # all ones for a code running on into the next word, else 0
    spill: int  # right shift of the word's last code that gives its bits in the next word


@lru_cache(maxsize=None)
def _group_tables(bits: int):
    """Packing by groups: ``bits`` words hold exactly 32 codes, code j of a group starting
    at bit j * bits of them (so only elementwise ops are needed, no gather per code)."""
    starts = np.arange(32) * bits
    word, shift = np.divmod(starts, 32)
    runs_on = shift + bits > 32
    # Shifting a uint32 by 32 is undefined: codes that end in their word use shift 0, mask 0.
    high_shift = np.where(runs_on, 32 - shift, 0).astype(np.uint32)
    high_mask = np.where(runs_on, 0xFFFFFFFF, 0).astype(np.uint32)
    out = []
    for p in range(bits):
        at = np.flatnonzero(word == p)
        out.append(_GroupWord(int(at[0]), mx.array(shift[at].astype(np.uint32)),
                              mx.array(high_shift[at]), mx.array(high_mask[at]),
                              int(high_shift[at[-1]])))  # fmt: skip
    return out


def _pack_groups(codes: mx.array, bits: int, count: int) -> mx.array:
    """:func:`pack` by groups of 32 codes: each word sums its codes shifted into place
    (disjoint bits, so the sum is an OR) plus the high part of a code that started in the
    word before."""
    lead = codes.shape[:-1]
    c = codes.astype(mx.uint32).reshape(*lead, count // 32, 32)
    words, spill = [], 0
    for g in _group_tables(bits):
        n = g.shift.size
        word = mx.left_shift(c[..., g.first : g.first + n], g.shift).sum(axis=-1, keepdims=True)
        if spill:
            word = word + mx.right_shift(c[..., g.first - 1 : g.first], spill)
        words.append(word.astype(mx.uint32))
        spill = g.spill
    return mx.concatenate(words, axis=-1).reshape(*lead, count * bits // 32)


def _unpack_groups(words: mx.array, bits: int, count: int) -> mx.array:
    """:func:`unpack` by groups of 32 codes, elementwise (the general path gathers every
    code's words: about 10x slower on the CPU backend)."""
    lead = words.shape[:-1]
    groups = words.reshape(*lead, count // 32, bits)
    parts = []
    for p, g in enumerate(_group_tables(bits)):
        part = mx.right_shift(groups[..., p : p + 1], g.shift)
        if g.spill:  # the next word holds the high bits of this word's last code
            part = part | (mx.left_shift(groups[..., p + 1 : p + 2], g.high_shift) & g.high_mask)
        parts.append(part)
    codes = mx.concatenate(parts, axis=-1)
    return (codes & ((1 << bits) - 1)).reshape(*lead, count)


def unpack(words: mx.array, bits: int, count: int) -> mx.array:
    """Inverse of :func:`pack`: ``[..., packed_words(count, bits)]`` uint32 to
    ``[..., count]`` uint32 codes."""
    _check(count, bits)
    if words.shape[-1] != packed_words(count, bits):
        raise ValueError(
            f"expected {packed_words(count, bits)} words for {count} codes of {bits} bits, "
            f"got {words.shape[-1]}"
        )
    if count % 32 == 0:
        return _unpack_groups(words, bits, count)
    return _unpack_by_tables(words, bits, count)


def _unpack_by_tables(words: mx.array, bits: int, count: int) -> mx.array:
    """:func:`unpack` for any count: each code gathers the word(s) it sits in."""
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
