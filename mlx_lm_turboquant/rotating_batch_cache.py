"""BatchRotatingTurboQuantKVCache: the batch form of ``RotatingTurboQuantKVCache``.

It follows mlx-lm 0.32.2's ``BatchRotatingKVCache`` step for step (left padding, per-row
``offset``, a shared physical write slot ``_idx`` and token count ``_offset``, the
``rotated`` flag, ``_lengths`` for right-padded prompts), because mlx-lm builds the
masks of sliding layers from those fields and a model's batch cache list may mix this
class with uncompressed layers. As in ``BatchRotatingKVCache`` there is no ``keep``:
caches merged into a batch lose it, and extracted rows come back with ``keep=0``.
Tokens are stored packed; rows are moved and rolled, never re-encoded.
"""

import mlx.core as mx
from mlx_lm.models.cache import BatchRotatingKVCache, RotatingKVCache, dynamic_roll

from .batch_cache import _NAMES, BatchTurboQuantKVCache, _as_list
from .cache import CompressedKV, TurboQuantKVCache, take_head_dims
from .rotating_cache import (
    RotatingTurboQuantKVCache, _check_window, compress_rotating_cache, grown_by,
)


class BatchRotatingTurboQuantKVCache(BatchTurboQuantKVCache):
    """A TurboQuant-compressed sliding-window cache for ``B`` left-padded sequences.

    Args:
        scheme: a :class:`KVScheme` or its name.
        left_padding: padding tokens in front of each row (``B`` ints).
        layer_index: the layer's index; seeds the layer's rotations.
        max_size: the window.

    Stored arrays as in :class:`BatchTurboQuantKVCache`, in ``BatchRotatingKVCache``'s
    slot order; ``left_padding`` may turn negative once rows wrap around (as there).
    """

    def __init__(self, scheme="turbo4", left_padding=None, layer_index: int = 0, *,
                 max_size: int):  # fmt: skip
        _check_window(max_size, 0)
        super().__init__(scheme, left_padding, layer_index)
        self.max_size = max_size
        self._offset = 0  # tokens written per row, padding included
        self.rotated = False
        self._lengths = None  # per-row end of the real tokens during a right-padded prefill

    @property
    def attended_tokens(self) -> int:
        if self.values is None:
            return 0
        return min(self._offset, self.values.shape[2])

    def _map(self, fn):
        self._set(None if a is None else fn(a) for a in self._arrays())

    def _in_temporal_order(self):
        if self.rotated:
            self._map(lambda a: mx.roll(a, -self._idx, axis=2))
            self._idx = self.values.shape[2]
            self.rotated = False

    def _roll_padding_left(self):
        """Move each row's right padding (tokens past its real length) to its left."""
        roll = mx.maximum(0, self.offset - self._lengths)
        self._map(lambda a: dynamic_roll(a, roll[:, None], axis=2))
        self.left_padding = self.left_padding + roll
        self.offset = self.offset - roll

    # -- the mlx-lm cache protocol ----------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        B, n_kv_heads, L, k_dim = keys.shape
        v_dim = values.shape[-1]
        if B != self.batch_size:
            raise ValueError(f"keys hold {B} rows, the batch cache {self.batch_size}")
        take_head_dims(self, keys, values)
        new = TurboQuantKVCache.encode_tokens(self, keys, values)
        if L == 1:
            self._write_in_place(new)
        else:
            self._append_in_order(new, L)
        T = self.attended_tokens
        return (
            CompressedKV(self, "keys", (B, n_kv_heads, T, k_dim), self.dtype),
            CompressedKV(self, "values", (B, n_kv_heads, T, v_dim), self.dtype),
        )

    def _append_in_order(self, new, L):
        if self.values is None:
            self._set(new)
        else:
            self._in_temporal_order()
            if self.values.shape[2] > self._idx:
                self._map(lambda a: a[:, :, : self._idx])
            if self._lengths is not None:  # never evict a real token for a padding one
                self._roll_padding_left()
            excess = self._idx - self.max_size + 1  # keep max_size - 1 old tokens
            if excess > 0:
                self.left_padding = self.left_padding - excess
                self._map(lambda a: a[:, :, excess:])
            self._set(None if a is None else mx.concatenate([a, b], axis=2)
                      for a, b in zip(self._arrays(), new))  # fmt: skip
        self.offset = self.offset + L
        self._offset += L
        self._idx = self.values.shape[2]

    def _write_in_place(self, new):
        if self._lengths is not None:
            raise ValueError("finalize() must be called after a right-padded prefill, before decoding")
        prev = self._offset
        cap = 0 if self.values is None else self.values.shape[2]
        if self.values is None or (prev >= cap and cap < self.max_size):
            self._set(grown_by(self._arrays(), new, min(self.step, self.max_size - prev)))
            self._idx = prev
        excess = self.values.shape[2] - self.max_size
        if excess > 0:
            self._map(lambda a: a[:, :, excess:])
            self._idx = self.max_size
            self.left_padding = self.left_padding - excess
        if self._idx == self.max_size:
            self.rotated = True
            self._idx = 0
        if self.rotated:  # the slot written next held each row's oldest token
            self.left_padding = self.left_padding - 1
        i = self._idx
        for name, x in zip(_NAMES, new):
            if x is not None:
                getattr(self, name)[:, :, i : i + 1] = x
        self._offset += 1
        self.offset = self.offset + 1
        self._idx += 1

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        super().prepare(left_padding=left_padding)
        if right_padding is not None and max(right_padding) > 0:
            self._lengths = mx.array(lengths, dtype=mx.int32) + self.offset

    def finalize(self):
        if self._lengths is not None:
            self._roll_padding_left()
            self._lengths = None

    def make_mask(self, N: int, window_size=None, return_array: bool = False):
        # Same fields, same layout as BatchRotatingKVCache: its mask is the right one.
        return BatchRotatingKVCache.make_mask(self, N, window_size=window_size,
                                              return_array=return_array)  # fmt: skip

    def size(self):
        return min(self._offset, self.max_size)

    def is_trimmable(self):
        return self._offset < self.max_size

    def trim(self, n):
        n = min(self._offset, n)
        self._offset -= n
        self._idx -= n
        self.offset = self.offset - n
        return n

    # -- batch operations -------------------------------------------------------

    def filter(self, batch_indices):
        """Keep only the rows ``batch_indices`` (in that order), in place. Unlike the
        full-attention cache no padding column is dropped (``_idx`` is a ring position)."""
        keep = _as_list(batch_indices, self.batch_size)
        if not keep:
            raise ValueError("filter needs at least one row to keep")
        idx = mx.array(keep)
        if self.values is not None:
            self._map(lambda a: a[idx])
        self.offset = self.offset[idx]
        self.left_padding = self.left_padding[idx]

    def extend(self, other: "BatchRotatingTurboQuantKVCache"):
        """Append the rows of ``other``, in place, right-aligning both at the later end."""
        if type(other) is not type(self):
            raise ValueError(f"cannot extend a {type(self).__name__} with {type(other).__name__}")
        if other.max_size != self.max_size:
            raise ValueError(f"cannot combine windows of {self.max_size} and {other.max_size} tokens")
        if self.values is None and other.values is None:
            return super().extend(other)
        if self.rotated != other.rotated or self._idx != other._idx:
            self._in_temporal_order()
            other._in_temporal_order()
        written = max(self._offset, other._offset)
        super().extend(other)
        self._offset = written

    def extract(self, idx: int) -> RotatingTurboQuantKVCache:
        """Row ``idx`` as a single compressed sliding-window cache (``keep=0``), its
        tokens in temporal order."""
        (idx,) = _as_list([idx], self.batch_size)
        cache = RotatingTurboQuantKVCache(self.scheme, self.layer_index, max_size=self.max_size)
        cache.k_dim, cache.v_dim, cache._dtype = self.k_dim, self.v_dim, self._dtype
        if self.values is None:
            return cache
        padding = max(0, self.left_padding.tolist()[idx])
        end = self._idx
        rows = [None if a is None else a[idx : idx + 1] for a in self._arrays()]
        if self.rotated:
            rows = [None if a is None else mx.roll(a, -self._idx, axis=2) for a in rows]
            end = self.max_size
        cache._set(tuple(None if a is None else mx.contiguous(a[:, :, padding:end]) for a in rows))
        cache.offset = self.offset.tolist()[idx]
        cache._idx = cache.values.shape[2]
        return cache

    @classmethod
    def merge(cls, caches) -> "BatchRotatingTurboQuantKVCache":
        """One batch cache from single sliding-window caches (``RotatingTurboQuantKVCache``,
        or plain ``RotatingKVCache`` whose contents are compressed here), each row's last
        ``size()`` tokens right-aligned in temporal order."""
        caches = list(caches)
        if not caches:
            raise ValueError("merge needs at least one cache")
        template = next((c for c in caches if isinstance(c, RotatingTurboQuantKVCache)), None)
        if template is None:
            raise ValueError("merge needs at least one RotatingTurboQuantKVCache to take the "
                             "scheme from")  # fmt: skip
        converted = []
        for c in caches:
            if isinstance(c, RotatingTurboQuantKVCache):
                converted.append(c)
            elif type(c) is RotatingKVCache:
                converted.append(compress_rotating_cache(c, template.scheme, template.layer_index))
            else:
                raise ValueError(
                    f"cannot merge a {type(c).__name__} into a batch sliding-window TurboQuant "
                    "cache; only RotatingTurboQuantKVCache and RotatingKVCache"
                )
        sizes = {c.max_size for c in converted}
        if len(sizes) > 1:
            raise ValueError(f"cannot merge sliding-window caches of sizes {sorted(sizes)}")
        lengths = [c.size() for c in converted]
        max_length = max(lengths)
        batch = cls(template.scheme, [max_length - n for n in lengths], template.layer_index,
                    max_size=template.max_size)  # fmt: skip
        for c in converted:
            batch._check_same_scheme(c)
            batch._take_format(c)
        if max_length == 0:
            return batch
        filled = [c for c, n in zip(converted, lengths) if n > 0]
        like = filled[0].temporal_fetch()
        B = len(converted)
        arrays = [
            None if a is None else mx.zeros((B, a.shape[1], max_length, *a.shape[3:]), a.dtype)
            for a in like
        ]
        for i, (c, n) in enumerate(zip(converted, lengths)):
            if n == 0:
                continue
            for dst, src in zip(arrays, c.temporal_fetch()):
                if dst is not None:
                    dst[i : i + 1, :, max_length - n :] = src
        batch._set(arrays)
        batch.offset = mx.array([c.offset for c in converted], dtype=mx.int32)
        batch._idx = batch._offset = max_length
        return batch

    # -- serialization ----------------------------------------------------------

    @property
    def state(self):
        return super().state + (self.max_size, self._offset, self.rotated)

    @state.setter
    def state(self, v):
        v = list(v)
        if len(v) != 22:
            raise ValueError(f"BatchRotatingTurboQuantKVCache state holds 22 items, got {len(v)}")
        max_size, written, rotated = v[19:]
        _check_window(max_size, 0)
        if isinstance(written, bool) or not isinstance(written, int) or written < 0:
            raise ValueError(f"_offset must be a non-negative int, got {written!r}")
        if rotated not in (True, False):  # 0 / 1 after a round trip through an array
            raise ValueError(f"rotated must be a bool, got {rotated!r}")
        self._load_state(v[:19])
        self.max_size, self._offset, self.rotated = max_size, written, bool(rotated)
        self._lengths = None

    def _check_padding(self, pads, idx):
        pass  # rows that wrapped around carry negative padding, as in BatchRotatingKVCache


__all__ = ["BatchRotatingTurboQuantKVCache"]
