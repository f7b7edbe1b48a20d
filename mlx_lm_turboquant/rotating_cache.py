"""RotatingTurboQuantKVCache: a sliding-window KV cache that keeps keys and values compressed.

It is mlx-lm 0.32.2's ``RotatingKVCache`` (``max_size`` tokens, the first ``keep`` tokens
never evicted) with packed codes and fp16 norms in place of float keys and values. The
stored arrays follow ``RotatingKVCache``'s buffer layout slot for slot, so that mlx-lm's
masks (built from ``offset``, ``_idx`` and ``max_size`` only) describe them exactly:

* one new token (decode) is written in place; once the buffer holds ``max_size`` tokens
  it wraps around to slot ``keep``, overwriting the oldest evictable token;
* several new tokens (prefill, speculative verification) are appended after the cached
  tokens put back in temporal order and cut to ``max_size - 1``, so each new token sees
  a full window; attention then reads up to ``max_size - 1 + L`` tokens, in order.

Tokens are encoded once, when they arrive; eviction and reordering move codes, never
re-encode them.
"""

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache

from .cache import _STATE_FIELDS, CompressedKV, TurboQuantKVCache, take_head_dims
from .config import parse_scheme

_ROTATING_FIELDS = ("keep", "max_size", "idx")


def grown_by(arrays, new, extra):
    """``arrays`` (None before the first tokens) with ``extra`` empty slots appended along
    the token axis, shaped like the ``new`` tokens' arrays."""
    grown = []
    for old, like in zip(arrays, new):
        if like is None:
            grown.append(None)
            continue
        zeros = mx.zeros((*like.shape[:2], extra, *like.shape[3:]), like.dtype)
        grown.append(zeros if old is None else mx.concatenate([old, zeros], axis=2))
    return tuple(grown)


def _check_window(max_size, keep):
    for field, x in (("max_size", max_size), ("keep", keep)):
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError(f"{field} must be an int, got {x!r}")
    if max_size < 1:
        raise ValueError(f"max_size must be at least 1, got {max_size}")
    if not 0 <= keep < max_size:
        raise ValueError(f"keep must be in [0, max_size={max_size}), got {keep}")


class RotatingTurboQuantKVCache(TurboQuantKVCache):
    """Sliding-window KV cache for one attention layer, TurboQuant-compressed.

    Args:
        scheme: a :class:`KVScheme` or its name.
        layer_index: the layer's index; seeds the layer's rotations.
        max_size: the window: at most this many tokens are kept (``keep`` included).
        keep: the first ``keep`` tokens of the sequence are never evicted.

    Stored arrays as in :class:`TurboQuantKVCache`, in ``RotatingKVCache``'s slot order;
    ``_idx`` is the next slot to write. Attention reads the first :attr:`attended_tokens`.
    """

    packs_rows = False  # the ring buffer writes its four arrays in place

    def __init__(self, scheme="turbo4", layer_index: int = 0, *, max_size: int, keep: int = 0):
        _check_window(max_size, keep)
        check_slidable(parse_scheme(scheme))
        super().__init__(scheme, layer_index)
        self.max_size, self.keep = max_size, keep
        self._idx = 0

    @property
    def attended_tokens(self) -> int:
        if self.values is None:
            return 0
        return min(self.offset, self.values.shape[2])

    def _arrays(self):
        return (self.keys, self.key_norms, self.values, self.value_norms)

    def _set(self, arrays):
        self.keys, self.key_norms, self.values, self.value_norms = arrays

    def _map(self, fn):
        self._set(tuple(None if a is None else fn(a) for a in self._arrays()))

    # -- the mlx-lm cache protocol ----------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Compress and add ``keys`` ``[B, H_kv, L, D_k]`` and ``values`` ``[B, H_kv, L, D_v]``."""
        B, n_kv_heads, L, k_dim = keys.shape
        v_dim = values.shape[-1]
        take_head_dims(self, keys, values)
        new = self.encode_tokens(keys, values)
        if L == 1:
            self._write_in_place(new)
        else:
            self._append_in_order(new, L)
        T = self.attended_tokens
        return (
            CompressedKV(self, "keys", (B, n_kv_heads, T, k_dim), self.dtype),
            CompressedKV(self, "values", (B, n_kv_heads, T, v_dim), self.dtype),
        )

    def _in_temporal_order(self):
        """The stored tokens oldest first (kept tokens, then the wrapped-around part),
        cut to the ``_idx`` slots written when the buffer has not wrapped."""
        cap = self.values.shape[2]
        if self._idx == cap:
            return
        if self._idx < self.offset:  # wrapped: slots [_idx, cap) are older than [keep, _idx)
            k, i = self.keep, self._idx
            self._map(lambda a: mx.concatenate([a[:, :, :k], a[:, :, i:], a[:, :, k:i]], axis=2))
        else:
            self._map(lambda a: a[:, :, : self._idx])

    def _drop_oldest(self, n):
        """Evict the ``n`` oldest tokens after the ``keep`` first ones."""
        if n > 0:
            k = self.keep
            self._map(lambda a: mx.concatenate([a[:, :, :k], a[:, :, k + n :]], axis=2))

    def _append_in_order(self, new, L):
        if self.values is None:
            self._set(new)
        else:
            self._in_temporal_order()
            # Keep max_size - 1 old tokens, so every new token attends to a full window.
            self._drop_oldest(self.values.shape[2] - self.max_size + 1)
            self._set(tuple(None if a is None else mx.concatenate([a, b], axis=2)
                            for a, b in zip(self._arrays(), new)))  # fmt: skip
        self.offset += L
        self._idx = self.values.shape[2]

    def _write_in_place(self, new):
        prev = self.offset
        cap = 0 if self.values is None else self.values.shape[2]
        if self.values is None or (prev >= cap and cap < self.max_size):
            # Grow towards max_size in steps, as RotatingKVCache does.
            self._set(grown_by(self._arrays(), new, min(self.step, self.max_size - prev)))
            self._idx = prev
        excess = self.values.shape[2] - self.max_size
        if excess > 0:  # after a multi-token update the buffer may exceed the window
            self._drop_oldest(excess)
            self._idx = self.max_size
        if self._idx == self.max_size:
            self._idx = self.keep
        i = self._idx
        for name, x in zip(("keys", "key_norms", "values", "value_norms"), new):
            if x is not None:
                getattr(self, name)[:, :, i : i + 1] = x
        self.offset += 1
        self._idx += 1

    def size(self):
        return min(self.offset, self.max_size)

    def is_trimmable(self):
        return self.offset < self.max_size

    def trim(self, n):
        n = min(self.offset, n)
        self.offset -= n
        self._idx -= n
        return n

    def make_mask(self, N: int, window_size=None, return_array: bool = False):
        # The layout is RotatingKVCache's, so its mask (computed from offset, _idx,
        # max_size alone) is the right one; reused rather than restated.
        return RotatingKVCache.make_mask(self, N, window_size=window_size,
                                         return_array=return_array)  # fmt: skip

    @classmethod
    def merge(cls, caches):
        """A ``BatchRotatingTurboQuantKVCache`` of ``caches`` (mlx-lm's batching entry point)."""
        from .rotating_batch_cache import BatchRotatingTurboQuantKVCache

        return BatchRotatingTurboQuantKVCache.merge(caches)

    def temporal_fetch(self):
        """The last :meth:`size` tokens, oldest first: ``(keys, key_norms, values, value_norms)``."""
        n = self.size()
        saved = (self._arrays(), self._idx)
        self._in_temporal_order()
        out = tuple(None if a is None else a[:, :, -n:] for a in self._arrays())
        self._set(saved[0])
        self._idx = saved[1]
        return out

    # -- serialization ----------------------------------------------------------

    _state_fields = _STATE_FIELDS + _ROTATING_FIELDS

    def _stored_arrays(self):
        return self._arrays()  # the whole buffer: _idx points into it

    def _scalars(self):
        return super()._scalars() + (self.keep, self.max_size, self._idx)

    @staticmethod
    def _parse_meta(v):
        return TurboQuantKVCache._parse_meta(v) + tuple(int(x) for x in v[len(_STATE_FIELDS) :])

    def _set_scalars(self, values):
        n = len(_STATE_FIELDS)
        keep, max_size, idx = values[n:]
        _check_window(max_size, keep)
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise ValueError(f"_idx must be a non-negative int, got {idx!r}")
        super()._set_scalars(values[:n])
        check_slidable(self.scheme)
        self.keep, self.max_size, self._idx = keep, max_size, idx

    def _check_positions(self, T: int):
        if self._idx > T:
            raise ValueError(f"_idx {self._idx} is beyond the {T} slots stored")
        if T < min(self.offset, self.max_size):
            raise ValueError(f"{T} slots stored cannot hold the last {min(self.offset, self.max_size)} "
                             f"tokens (offset {self.offset}, max_size {self.max_size})")  # fmt: skip


def check_slidable(scheme):
    """A sliding window keeps no separate recent-token window, and its ring buffer does not
    track positions, which centred keys need."""
    if scheme.window:
        raise ValueError(
            f"scheme {scheme.name!r} keeps a recent-token window, which sliding-window "
            "caches do not: use the scheme without w<N> (make_prompt_cache drops it there)"
        )
    if scheme.centre_keys:
        raise ValueError(
            f"scheme {scheme.name!r} centres keys in RoPE's frame, which sliding-window "
            "caches do not: use the scheme without c (make_prompt_cache drops it there)"
        )


def compress_rotating_cache(cache: RotatingKVCache, scheme, layer_index: int = 0):
    """A ``RotatingTurboQuantKVCache`` holding the compressed contents of a ``RotatingKVCache``
    (its tokens in temporal order, as after a multi-token update)."""
    out = RotatingTurboQuantKVCache(scheme, layer_index, max_size=cache.max_size, keep=cache.keep)
    if cache.keys is not None and cache.offset > 0:
        out.update_and_fetch(cache._temporal_order(cache.keys), cache._temporal_order(cache.values))
        out.offset = cache.offset
    return out


__all__ = ["RotatingTurboQuantKVCache", "compress_rotating_cache"]
