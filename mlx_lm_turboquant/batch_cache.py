"""BatchTurboQuantKVCache: the batch form of ``TurboQuantKVCache`` for continuous batching.

It follows mlx-lm's ``BatchKVCache`` protocol step for step (left padding, per-row
``offset``, one physical end ``_idx`` shared by every row, ``merge`` / ``extract`` /
``filter`` / ``extend`` / ``prepare`` / ``finalize``), because a model's batch cache list
may mix both classes (e.g. the last layer kept fp16) and one layer's mask serves all
layers: every operation must move ``_idx`` and ``left_padding`` exactly as
``BatchKVCache`` does. Tokens are stored packed; rows are moved, never re-encoded.
"""

from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, _BaseCache, dynamic_roll

from .cache import (
    MAX_HEAD_DIM, CompressedKV, TurboQuantKVCache, array_or_none, check_channel_order,
    take_head_dims,
)
from .codec.split import identity_channels
from .config import KVScheme, parse_scheme

_NAMES = ("keys", "key_norms", "values", "value_norms")  # per token: [B, H_kv, T, ...]
_CHANNELS = ("key_channels", "value_channels")  # per row, split schemes only: [B, H_kv, D]


def _as_list(indices, n_rows: int) -> List[int]:
    if isinstance(indices, mx.array):
        indices = indices.tolist()
    indices = [int(i) for i in indices]
    for i in indices:
        if not 0 <= i < n_rows:
            raise ValueError(f"batch index {i} is outside a batch of {n_rows} rows")
    return indices


class BatchTurboQuantKVCache(_BaseCache):
    """A TurboQuant-compressed KV cache for ``B`` left-padded sequences.

    Args:
        scheme: a :class:`KVScheme` or its name.
        left_padding: padding tokens in front of each row (``B`` ints).
        layer_index: the layer's index; seeds the layer's rotations (as in the single cache).

    Stored arrays (``T`` = capacity; row ``b`` holds its tokens in ``[left_padding[b], _idx)``):
        keys: ``[B, H_kv, T, words_k]`` uint32 (``[B, H_kv, T, D_k]`` float when key_bits == 0).
        key_norms: ``[B, H_kv, T]`` float16 (None when key_bits == 0).
        values: ``[B, H_kv, T, words_v]`` uint32.
        value_norms: ``[B, H_kv, T]`` float16.
        (norms carry a trailing axis of 2 for prod keys and split schemes, as in the single cache)
        key_channels, value_channels: split schemes only, ``[B, H_kv, D]`` int32, each row's
            channel order chosen from its own first tokens (padding left out); rows move with
            their channel orders. A row that joins without tokens keeps the model's order.
        offset: ``[B]`` int32, the position of the next token of each row (RoPE offset).
        left_padding: ``[B]`` int32.
    """

    step = 256

    def __init__(self, scheme="turbo4", left_padding: Optional[List[int]] = None,
                 layer_index: int = 0):  # fmt: skip
        if left_padding is None:
            raise ValueError("BatchTurboQuantKVCache needs left_padding, one int per row")
        left_padding = [int(p) for p in left_padding]
        if any(p < 0 for p in left_padding):
            raise ValueError(f"left_padding must be non-negative, got {left_padding}")
        scheme = parse_scheme(scheme)
        check_batchable(scheme)
        single = TurboQuantKVCache(scheme, layer_index)  # validates layer_index
        self.scheme: KVScheme = single.scheme
        self.layer_index = layer_index
        self.keys = self.key_norms = self.values = self.value_norms = None
        self.key_channels = self.value_channels = None
        self.k_dim = self.v_dim = None
        self.dtype = None
        self.left_padding = mx.array(left_padding, dtype=mx.int32)
        self.offset = -self.left_padding
        self._idx = 0
        self._right_padding = None

    # Same dtype-by-name trick and the same codecs as the single cache.
    dtype = TurboQuantKVCache.dtype
    key_codec = TurboQuantKVCache.key_codec
    value_codec = TurboQuantKVCache.value_codec
    plain = TurboQuantKVCache.plain

    def _token_weights(self, L):
        """``[B, L]``: 1 where a new token is real, 0 where it is left padding."""
        positions = mx.arange(self._idx, self._idx + L)[None, :]
        return positions >= self.left_padding[:, None]

    def _channels(self):
        return tuple(getattr(self, n) for n in _CHANNELS)

    def _set_channels(self, channels):
        for name, a in zip(_CHANNELS, channels):
            setattr(self, name, a)

    @property
    def batch_size(self) -> int:
        return self.left_padding.shape[0]

    def _arrays(self):
        return tuple(getattr(self, n) for n in _NAMES)

    def _set(self, arrays):
        for name, a in zip(_NAMES, arrays):
            setattr(self, name, a)

    def _take_format(self, other):
        """Adopt ``other``'s head dims / dtype, or check they agree with ours."""
        if other.k_dim is None:
            return
        if self.k_dim is None:
            self.k_dim, self.v_dim, self._dtype = other.k_dim, other.v_dim, other._dtype
        elif (self.k_dim, self.v_dim, self._dtype) != (other.k_dim, other.v_dim, other._dtype):
            raise ValueError(
                f"cannot combine caches with D_k={self.k_dim}, D_v={self.v_dim}, {self._dtype} "
                f"and D_k={other.k_dim}, D_v={other.v_dim}, {other._dtype}"
            )

    def _check_same_scheme(self, other):
        if other.scheme != self.scheme or other.layer_index != self.layer_index:
            raise ValueError(
                f"cannot combine a {other.scheme.name} cache of layer {other.layer_index} "
                f"with a {self.scheme.name} cache of layer {self.layer_index}"
            )

    # -- the mlx-lm cache protocol ----------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Compress and append ``keys`` ``[B, H_kv, L, D_k]`` and ``values``
        ``[B, H_kv, L, D_v]`` at the physical end of every row."""
        B, n_kv_heads, L, k_dim = keys.shape
        v_dim = values.shape[-1]
        if B != self.batch_size:
            raise ValueError(f"keys hold {B} rows, the batch cache {self.batch_size}")
        take_head_dims(self, keys, values)
        new = TurboQuantKVCache.encode_tokens(self, keys, values)

        prev = self._idx
        if self.keys is None or prev + L > self.values.shape[2]:
            n_steps = (self.step + L - 1) // self.step
            grown = []
            for old, like in zip(self._arrays(), new):
                if like is None:
                    grown.append(None)
                    continue
                shape = list(like.shape)
                shape[2] = n_steps * self.step
                extra = mx.zeros(shape, like.dtype)
                grown.append(extra if old is None else mx.concatenate([old[:, :, :prev], extra], 2))
            self._set(grown)
        self._idx += L
        self.offset = self.offset + L
        for name, x in zip(_NAMES, new):
            if x is not None:
                getattr(self, name)[:, :, prev : self._idx] = x
        return (
            CompressedKV(self, "keys", (B, n_kv_heads, self._idx, k_dim), self.dtype),
            CompressedKV(self, "values", (B, n_kv_heads, self._idx, v_dim), self.dtype),
        )

    @property
    def attended_tokens(self) -> int:
        """How many slots of every row attention reads (padding included, masked out):
        the physical end ``_idx`` here."""
        return self._idx

    def keys_and_values(self):
        """Handles on the cached keys and values (see ``TurboQuantKVCache.keys_and_values``)."""
        B, n_kv_heads, T = self.values.shape[0], self.values.shape[1], self.attended_tokens
        return (
            CompressedKV(self, "keys", (B, n_kv_heads, T, self.k_dim), self.dtype),
            CompressedKV(self, "values", (B, n_kv_heads, T, self.v_dim), self.dtype),
        )

    def attention_cache(self) -> TurboQuantKVCache:
        """A single-cache view of all rows (``offset`` = :attr:`attended_tokens`), sharing
        this cache's arrays: what ``turboquant_sdpa`` reads. Padding is excluded by the
        mask from :meth:`make_mask`."""
        view = TurboQuantKVCache(self.scheme, self.layer_index)  # every default attribute
        view.k_dim, view.v_dim, view._dtype = self.k_dim, self.v_dim, self._dtype
        view.keys, view.key_norms, view.values, view.value_norms = self._arrays()
        view.key_channels, view.value_channels = self._channels()
        view.offset = self.attended_tokens
        return view

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty batch cache")
            left_padding = mx.array(left_padding, dtype=mx.int32)
            self.left_padding = self.left_padding + left_padding
            self.offset = self.offset - left_padding
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding, dtype=mx.int32)

    def finalize(self):
        """Turn the right padding of the last ``prepare`` into left padding."""
        if self._right_padding is None:
            return
        padding = self._right_padding
        if self.keys is not None:
            self._set(
                None if a is None else dynamic_roll(a, padding[:, None], axis=2)
                for a in self._arrays()
            )
        self.offset = self.offset - padding
        self.left_padding = self.left_padding + padding
        self._right_padding = None

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    def size(self):
        return self._idx

    def empty(self):
        return self.keys is None

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self._arrays() + self._channels() if a is not None)

    # -- batch operations -------------------------------------------------------

    def filter(self, batch_indices):
        """Keep only the rows ``batch_indices`` (in that order), in place."""
        keep = _as_list(batch_indices, self.batch_size)
        if not keep:
            raise ValueError("filter needs at least one row to keep")
        idx = mx.array(keep)
        if self.keys is not None:
            self._set(None if a is None else a[idx] for a in self._arrays())
        self._set_channels(None if a is None else a[idx] for a in self._channels())
        self.offset = self.offset[idx]
        self.left_padding = self.left_padding[idx]
        # Drop the padding columns every kept row has (as BatchKVCache does).
        shift = min(self.left_padding.tolist())
        if shift > 0:
            if self.keys is not None:
                self._set(None if a is None else a[:, :, shift:] for a in self._arrays())
            self._idx -= shift
            self.left_padding = self.left_padding - shift

    def extend(self, other: "BatchTurboQuantKVCache"):
        """Append the rows of ``other``, in place, right-aligning both at the later end."""
        if type(other) is not type(self):
            raise ValueError(
                f"cannot extend a {type(self).__name__} with {type(other).__name__}"
            )
        self._check_same_scheme(other)
        self._take_format(other)
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        ref = self if self.keys is not None else other
        max_idx = max(self._idx, other._idx)
        max_size = max(c.values.shape[2] for c in (self, other) if c.values is not None)

        def pad(c):
            arrays = list(c._arrays())
            if c.keys is None:
                Bc = c.batch_size
                arrays = [
                    None if a is None else mx.zeros((Bc, a.shape[1], 0, *a.shape[3:]), a.dtype)
                    for a in ref._arrays()
                ]
            left = max_idx - c._idx
            right = max_size - arrays[2].shape[2] - left
            out = []
            for a in arrays:
                if a is None:
                    out.append(None)
                    continue
                if right < 0:
                    a = a[:, :, :right]
                if left or right > 0:
                    widths = [(0, 0), (0, 0), (left, max(right, 0))] + [(0, 0)] * (a.ndim - 3)
                    a = mx.pad(a, widths)
                out.append(a)
            return out, c.offset, c.left_padding + left

        (a1, o1, p1), (a2, o2, p2) = pad(self), pad(other)
        if self.scheme.variant == "split":
            H = ref.values.shape[1]

            def orders(c):  # rows that joined without tokens keep the model's order
                if c.key_channels is not None:
                    return c._channels()
                return (identity_channels(c.batch_size, H, self.k_dim),
                        identity_channels(c.batch_size, H, self.v_dim))  # fmt: skip

            c1, c2 = orders(self), orders(other)
            self._set_channels(mx.concatenate([x, y]) for x, y in zip(c1, c2))
        self._set(None if x is None else mx.concatenate([x, y]) for x, y in zip(a1, a2))
        self.offset = mx.concatenate([o1, o2])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = max_idx

    def extract(self, idx: int) -> TurboQuantKVCache:
        """Row ``idx`` as a single compressed cache (its own copy, sized to its tokens)."""
        (idx,) = _as_list([idx], self.batch_size)
        cache = TurboQuantKVCache(self.scheme, self.layer_index)
        cache.k_dim, cache.v_dim, cache._dtype = self.k_dim, self.v_dim, self._dtype
        if self.keys is None:
            return cache
        start = self.left_padding.tolist()[idx]
        cache.keys, cache.key_norms, cache.values, cache.value_norms = (
            None if a is None else mx.contiguous(a[idx : idx + 1, :, start : self._idx])
            for a in self._arrays()
        )
        cache.key_channels, cache.value_channels = (
            None if a is None else mx.contiguous(a[idx : idx + 1]) for a in self._channels()
        )
        cache.offset = self._idx - start
        return cache

    @classmethod
    def merge(cls, caches) -> "BatchTurboQuantKVCache":
        """One batch cache from single caches (``TurboQuantKVCache``, or plain ``KVCache``
        whose contents are compressed here), right-aligned with left padding."""
        caches = list(caches)
        if not caches:
            raise ValueError("merge needs at least one cache")
        from .rotating_cache import RotatingTurboQuantKVCache

        full = [isinstance(c, TurboQuantKVCache) and not isinstance(c, RotatingTurboQuantKVCache)
                for c in caches]  # fmt: skip
        template = next((c for c, f in zip(caches, full) if f), None)
        if template is None:
            raise ValueError("merge needs at least one TurboQuantKVCache to take the scheme from")
        converted = []
        for c, f in zip(caches, full):
            if f:
                converted.append(c)
            elif type(c) is KVCache:
                converted.append(compress_kv_cache(c, template.scheme, template.layer_index))
            else:
                raise ValueError(
                    f"cannot merge a {type(c).__name__} into a batch TurboQuant cache; "
                    "only TurboQuantKVCache and KVCache"
                )
        lengths = [c.size() for c in converted]
        max_length = max(lengths)
        batch = cls(template.scheme, [max_length - n for n in lengths], template.layer_index)
        for c in converted:
            batch._check_same_scheme(c)
            batch._take_format(c)
        batch.offset = batch.offset + max_length
        if max_length == 0:
            return batch
        B = len(converted)
        filled = [c for c in converted if c.keys is not None and c.offset > 0]
        like = filled[0].fetch()
        arrays = [
            None if a is None else mx.zeros((B, a.shape[1], max_length, *a.shape[3:]), a.dtype)
            for a in like
        ]
        for i, c in enumerate(converted):
            if c.keys is None or c.offset == 0:
                continue
            p = max_length - c.offset
            for dst, src in zip(arrays, c.fetch()):
                if dst is not None:
                    dst[i : i + 1, :, p:] = src
        batch._set(arrays)
        if template.scheme.variant == "split":
            H = like[2].shape[1]
            batch._set_channels(
                mx.concatenate([
                    getattr(c, name) if getattr(c, name) is not None
                    else identity_channels(1, H, dim)
                    for c in converted
                ])
                for name, dim in zip(_CHANNELS, (batch.k_dim, batch.v_dim))
            )  # fmt: skip
        batch._idx = max_length
        return batch

    # -- serialization ----------------------------------------------------------

    @property
    def state(self):
        s = self.scheme
        return self._arrays() + (
            self.offset, self.left_padding, self._idx, s.name, s.key_bits, s.value_bits,
            s.norm_correction, s.seed, self.layer_index, self.k_dim, self.v_dim, self._dtype,
            s.variant,
        ) + self._channels()  # fmt: skip

    @state.setter
    def state(self, v):
        v = list(v)
        if len(v) == 16:  # written before the variant and channel orders existed
            v += ["mse", None, None]
        if len(v) != 19:
            raise ValueError(f"BatchTurboQuantKVCache state holds 19 items, got {len(v)}")
        self._load_state(v)

    def _check_padding(self, pads, idx):
        if any(not 0 <= p <= idx for p in pads):
            raise ValueError(f"left_padding {pads} must lie in [0, {idx}]")

    def _load_state(self, v):
        """Check and take the 19 items of a ``BatchTurboQuantKVCache`` state."""
        arrays, (offset, left_padding, idx), scalars, channels = v[:4], v[4:7], v[7:17], v[17:]
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise ValueError(f"_idx must be a non-negative int, got {idx!r}")
        name, kb, vb, nc, seed, layer, k_dim, v_dim, dtype, variant = scalars
        # The single cache checks the scalars and the arrays of one row (offset = _idx).
        single = TurboQuantKVCache.__new__(TurboQuantKVCache)
        single._set_scalars((name, kb, vb, nc, seed, layer, idx, k_dim, v_dim, dtype, variant))
        check_batchable(single.scheme)
        arrays, channels = list(map(array_or_none, arrays)), list(map(array_or_none, channels))
        if arrays[2] is not None:
            row = [None if a is None else a[:1] for a in arrays]
            single.keys, single.key_norms, single.values, single.value_norms = row
            single.key_channels, single.value_channels = (
                None if a is None else a[:1] for a in channels
            )
            single._validate()
        elif idx:
            raise ValueError("BatchTurboQuantKVCache state has no values but claims tokens")
        for field, a in (("offset", offset), ("left_padding", left_padding)):
            if not isinstance(a, mx.array) or a.ndim != 1:
                raise ValueError(f"{field} must be a 1-d array")
        B = left_padding.shape[0]
        if offset.shape[0] != B or (arrays[2] is not None and any(
                a is not None and a.shape[0] != B for a in arrays + channels)):  # fmt: skip
            raise ValueError(f"batch arrays disagree on the number of rows ({B})")
        for field, a in zip(_CHANNELS, channels):
            if a is not None:
                check_channel_order(field, a)
        self._check_padding(left_padding.tolist(), idx)
        self.scheme, self.layer_index = single.scheme, single.layer_index
        self.k_dim, self.v_dim, self._dtype = single.k_dim, single.v_dim, single._dtype
        self._set(arrays)
        self._set_channels(channels)
        self.offset, self.left_padding = offset.astype(mx.int32), left_padding.astype(mx.int32)
        self._idx = idx
        self._right_padding = None

    @classmethod
    def from_state(cls, state, meta_state=None):
        if meta_state is not None:
            raise ValueError("BatchTurboQuantKVCache keeps its scalars in state, not meta_state")
        obj = cls.__new__(cls)
        obj.state = state
        return obj


def check_batchable(scheme: KVScheme):
    """Batched caches store neither a recent-token window nor centred keys (yet)."""
    if scheme.window:
        raise ValueError(
            f"scheme {scheme.name!r} keeps a recent-token window, which batched "
            "caches do not support yet; use it without batching, or a scheme without w<N>"
        )
    if scheme.centre_keys:
        raise ValueError(
            f"scheme {scheme.name!r} centres keys in RoPE's frame, which batched caches "
            "(rows at different positions) do not support yet; use it without batching, or "
            "the scheme without c"
        )


def compress_kv_cache(cache: KVCache, scheme, layer_index: int = 0) -> TurboQuantKVCache:
    """A ``TurboQuantKVCache`` holding the compressed contents of a plain ``KVCache``."""
    out = TurboQuantKVCache(parse_scheme(scheme) if isinstance(scheme, str) else scheme,
                            layer_index)  # fmt: skip
    if cache.keys is not None and cache.offset > 0:
        if not 0 < cache.keys.shape[-1] <= MAX_HEAD_DIM:
            raise ValueError(f"KVCache head dim {cache.keys.shape[-1]} is not supported")
        out.update_and_fetch(cache.keys[:, :, : cache.offset], cache.values[:, :, : cache.offset])
    return out


__all__ = ["BatchTurboQuantKVCache", "compress_kv_cache"]
