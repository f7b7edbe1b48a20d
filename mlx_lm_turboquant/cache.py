"""TurboQuantKVCache: an mlx-lm KV cache that keeps keys and values compressed.

Tokens are encoded as they arrive (prefill chunks included), so no float copy of the
cache ever exists. Storage grows in steps of ``step`` tokens like mlx-lm's KVCache.
Attention reads the packed data directly (see ``attention.turboquant_sdpa``); the
arrays returned by ``update_and_fetch`` are only handles that describe the cache.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from . import kernels
from .codec import get_codec
from .codec.packing import packed_words
from .config import KVScheme, parse_scheme

# mlx-lm <= 0.32.0 keeps scalars in `meta_state` (strings) and calls
# `from_state(state, meta_state)`; 0.32.2 stores Python scalars inside `state`.
USES_META_STATE = hasattr(_BaseCache, "meta_state")

# Bounds on what a loaded prompt-cache file may claim, checked before any codec is
# built from it (a codec for dimension D holds a D x D rotation).
MAX_HEAD_DIM = 4096
MAX_NAME = 64

_STATE_FIELDS = (
    "scheme", "key_bits", "value_bits", "norm_correction", "seed",
    "layer_index", "offset", "k_dim", "v_dim", "dtype",
)  # fmt: skip


@lru_cache(maxsize=None)  # looked up for every layer at every decode step
def layer_seed(base_seed: int, layer_index: int, kind: int) -> int:
    """A rotation seed per (layer, keys=0 / values=1), stable across runs and platforms."""
    return int(np.random.SeedSequence([base_seed, layer_index, kind]).generate_state(1)[0])


class CompressedKV:
    """What ``update_and_fetch`` returns: a handle on the cache, not an array.

    Attention on it goes through the patched dispatcher. Code that treats it as an
    array (a model doing its own attention) fails loudly instead of silently reading
    packed bits as floats.
    """

    def __init__(self, cache: "TurboQuantKVCache", kind: str, shape, dtype):
        self.cache, self.kind, self.shape, self.dtype = cache, kind, tuple(shape), dtype

    @property
    def ndim(self):
        return len(self.shape)

    def astype(self, dtype):
        """Still a handle: attention computes in float32 and returns the queries' dtype."""
        return CompressedKV(self.cache, self.kind, self.shape, dtype)

    def __repr__(self):
        return f"CompressedKV({self.kind}, shape={self.shape}, scheme={self.cache.scheme.name})"


class TurboQuantKVCache(_BaseCache):
    """KV cache for one attention layer, TurboQuant-compressed.

    Args:
        scheme: a :class:`KVScheme` or its name (``"turbo4"``, ``"turbo0v4"``, ...).
        layer_index: the layer's index; seeds the layer's rotations.

    Stored arrays (``T`` = capacity, grown in steps of ``step``):
        keys: ``[B, H_kv, T, words_k]`` uint32, or ``[B, H_kv, T, D_k]`` float when key_bits == 0.
        key_norms: ``[B, H_kv, T]`` float16 (None when key_bits == 0).
        values: ``[B, H_kv, T, words_v]`` uint32.
        value_norms: ``[B, H_kv, T]`` float16.
        recent_keys, recent_values: ``[B, H_kv, r, D]`` in the model's dtype, the last
            ``r <= scheme.window`` tokens uncompressed (None without a window). Those tokens
            are stored packed too; attention reads them from here.
    """

    step = 256

    def __init__(self, scheme="turbo4", layer_index: int = 0):
        self.scheme: KVScheme = parse_scheme(scheme)
        if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
            raise ValueError(f"layer_index must be a non-negative int, got {layer_index!r}")
        self.layer_index = layer_index
        self.offset = 0
        self.keys = self.key_norms = self.values = self.value_norms = None
        self.recent_keys = self.recent_values = None
        self.k_dim = self.v_dim = None
        self.dtype = None

    # mx.Dtype cannot be deep-copied (the server's prompt cache deep-copies caches),
    # so the dtype is kept by name.
    @property
    def dtype(self):
        return None if self._dtype is None else getattr(mx, self._dtype)

    @dtype.setter
    def dtype(self, value):
        self._dtype = None if value is None else str(value).split(".")[-1]

    # -- codecs -----------------------------------------------------------------

    @property
    def key_codec(self):
        if self.scheme.key_bits == 0 or self.k_dim is None:
            return None
        seed = layer_seed(self.scheme.seed, self.layer_index, 0)
        return get_codec(self.k_dim, self.scheme.key_bits, seed, self.scheme.norm_correction)

    @property
    def value_codec(self):
        if self.v_dim is None:
            return None
        seed = layer_seed(self.scheme.seed, self.layer_index, 1)
        return get_codec(self.v_dim, self.scheme.value_bits, seed, self.scheme.norm_correction)

    # -- the mlx-lm cache protocol ----------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Compress and append ``keys`` ``[B, H_kv, L, D_k]`` and ``values`` ``[B, H_kv, L, D_v]``."""
        B, n_kv_heads, L, k_dim = keys.shape
        v_dim = values.shape[-1]
        if self.k_dim is None:
            self.k_dim, self.v_dim, self.dtype = k_dim, v_dim, keys.dtype
        elif (k_dim, v_dim) != (self.k_dim, self.v_dim):
            raise ValueError(
                f"head dims changed: cache holds D_k={self.k_dim}, D_v={self.v_dim}, "
                f"got keys {keys.shape} and values {values.shape}"
            )
        new_keys, new_key_norms, new_values, new_value_norms = self.encode_tokens(keys, values)

        prev = self.offset
        if self.keys is None or prev + L > self.keys.shape[2]:
            self._grow(prev, L, new_keys, new_key_norms, new_values, new_value_norms)
        self.offset += L
        self.keys[:, :, prev : self.offset] = new_keys
        self.values[:, :, prev : self.offset] = new_values
        if new_key_norms is not None:
            self.key_norms[:, :, prev : self.offset] = new_key_norms
        self.value_norms[:, :, prev : self.offset] = new_value_norms
        if self.scheme.window:
            self._keep_recent(keys, values)
        return (
            CompressedKV(self, "keys", (B, n_kv_heads, self.offset, k_dim), self.dtype),
            CompressedKV(self, "values", (B, n_kv_heads, self.offset, v_dim), self.dtype),
        )

    def _keep_recent(self, keys, values):
        w = self.scheme.window
        keys, values = keys[:, :, -w:].astype(self.dtype), values[:, :, -w:].astype(self.dtype)
        if self.recent_keys is not None and keys.shape[2] < w:
            keys = mx.concatenate([self.recent_keys, keys], axis=2)[:, :, -w:]
            values = mx.concatenate([self.recent_values, values], axis=2)[:, :, -w:]
        self.recent_keys, self.recent_values = keys, values

    @property
    def recent(self):
        """``(keys, values)`` of the last tokens kept uncompressed, or None."""
        if getattr(self, "recent_keys", None) is None or self.recent_keys.shape[2] == 0:
            return None
        return self.recent_keys, self.recent_values

    def encode_tokens(self, keys, values):
        """``(keys, key_norms, values, value_norms)`` as stored, for new tokens.

        Single and batch caches share this, so a sequence gets the same codes whether
        it runs alone or batched (fused and pure encodes may round differently).
        """
        if self.scheme.key_bits == 0:
            return (keys.astype(self.dtype), None, *kernels.encode(self.value_codec, values))
        return kernels.encode_kv(self.key_codec, keys, self.value_codec, values)

    def _grow(self, prev, L, *new):
        """Allocate room for at least ``L`` more tokens, in whole steps.

        The old contents are copied once per step (as in mlx-lm's KVCache), never
        per token.
        """
        n_steps = (self.step + L - 1) // self.step
        names = ("keys", "key_norms", "values", "value_norms")
        for name, like in zip(names, new):
            if like is None:
                continue
            shape = list(like.shape)
            shape[2] = n_steps * self.step
            extra = mx.zeros(shape, like.dtype)
            old = getattr(self, name)
            if old is None:
                setattr(self, name, extra)
            else:
                setattr(self, name, mx.concatenate([old[:, :, :prev], extra], axis=2))

    def keys_and_values(self):
        """Handles on the cached keys and values (models that share one layer's KV with
        later layers read them this way; attention on them goes through the dispatcher)."""
        B, n_kv_heads = self.values.shape[:2]
        return (
            CompressedKV(self, "keys", (B, n_kv_heads, self.offset, self.k_dim), self.dtype),
            CompressedKV(self, "values", (B, n_kv_heads, self.offset, self.v_dim), self.dtype),
        )

    def size(self):
        return self.offset

    def empty(self):
        return self.keys is None

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self.offset, n)
        self.offset -= n
        if self.recent_keys is not None:  # the window refills as tokens arrive
            r = max(0, self.recent_keys.shape[2] - n)
            self.recent_keys = self.recent_keys[:, :, :r]
            self.recent_values = self.recent_values[:, :, :r]
        return n

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    @classmethod
    def merge(cls, caches):
        """A ``BatchTurboQuantKVCache`` of ``caches`` (mlx-lm's batching entry point)."""
        from .batch_cache import BatchTurboQuantKVCache

        return BatchTurboQuantKVCache.merge(caches)

    @property
    def nbytes(self):
        """Bytes of the arrays this cache holds (capacity included, like KVCache)."""
        arrays = (self.keys, self.key_norms, self.values, self.value_norms,
                  self.recent_keys, self.recent_values)  # fmt: skip
        return sum(a.nbytes for a in arrays if a is not None)

    def bytes_per_token(self) -> int:
        """Bytes one token costs in this layer; 0 before the first update."""
        if self.k_dim is None:
            return 0
        return self.scheme.bytes_per_token(self.keys.shape[1], self.k_dim, self.v_dim)

    # -- reading the data back --------------------------------------------------

    def fetch(self):
        """The used part of the stored arrays: ``(keys, key_norms, values, value_norms)``."""
        T = self.offset
        key_norms = None if self.key_norms is None else self.key_norms[:, :, :T]
        return (self.keys[:, :, :T], key_norms, self.values[:, :, :T], self.value_norms[:, :, :T])

    def dequantize(self, dtype=mx.float32):
        """Keys ``[B, H_kv, offset, D_k]`` and values ``[B, H_kv, offset, D_v]`` in the
        original basis. For tests and debugging: attention never needs this."""
        keys, key_norms, values, value_norms = self.fetch()
        if self.scheme.key_bits == 0:
            keys = keys.astype(dtype)
        else:
            keys = self.key_codec.decode(keys, key_norms, dtype)
        values = self.value_codec.decode(values, value_norms, dtype)
        if self.recent is not None:  # what attention reads for the last tokens
            r = self.recent_keys.shape[2]
            old = self.offset - r
            keys = mx.concatenate([keys[:, :, :old], self.recent_keys.astype(dtype)], 2)
            values = mx.concatenate([values[:, :, :old], self.recent_values.astype(dtype)], 2)
        return keys, values

    # -- serialization ----------------------------------------------------------

    def _scalars(self):
        s = self.scheme
        return (
            s.name, s.key_bits, s.value_bits, s.norm_correction, s.seed,
            self.layer_index, self.offset, self.k_dim, self.v_dim, self._dtype,
        )  # fmt: skip

    @property
    def state(self):
        if self.keys is None:
            arrays = (None, None, None, None)
        else:
            arrays = self.fetch()
        if self.scheme.window:  # two more arrays, only for schemes with a window
            arrays = arrays + (self.recent_keys, self.recent_values)
        if USES_META_STATE:
            return tuple(a if a is not None else mx.array([]) for a in arrays)
        return arrays + self._scalars()

    @state.setter
    def state(self, v):
        v = list(v)
        if USES_META_STATE:
            n = 6 if self.scheme.window else 4
            if len(v) != n:
                raise ValueError(f"TurboQuantKVCache state holds {n} arrays, got {len(v)} items")
            arrays = v
        else:
            n = len(v) - len(_STATE_FIELDS)
            if n not in (4, 6):
                raise ValueError(
                    f"TurboQuantKVCache state holds 4 or 6 arrays and {len(_STATE_FIELDS)} "
                    f"scalars, got {len(v)} items"
                )
            arrays = v[:n]
            self._set_scalars(v[n:])
            if n != (6 if self.scheme.window else 4):
                raise ValueError(f"scheme {self.scheme.name!r} does not match {n} state arrays")
        self._set_arrays(arrays)

    @property
    def meta_state(self):
        return tuple("" if x is None else str(x) for x in self._scalars())

    @meta_state.setter
    def meta_state(self, v):
        v = list(v)
        if len(v) != len(_STATE_FIELDS):
            raise ValueError(f"meta_state holds {len(_STATE_FIELDS)} strings, got {len(v)}")
        name, kb, vb, nc, seed, layer, offset, k_dim, v_dim, dtype = v
        as_int = lambda x: None if x in ("", "None") else int(x)  # noqa: E731
        self._set_scalars(
            (name, int(kb), int(vb), nc == "True", int(seed), int(layer),
             int(offset), as_int(k_dim), as_int(v_dim), dtype or None)
        )  # fmt: skip

    def _set_scalars(self, values):
        name, kb, vb, nc, seed, layer, offset, k_dim, v_dim, dtype = values
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise ValueError(f"scheme name must be a string of 1 to {MAX_NAME} characters")
        for field, x in (("key_bits", kb), ("value_bits", vb), ("seed", seed)):
            if isinstance(x, bool) or not isinstance(x, int):
                raise ValueError(f"{field} must be an int, got {x!r}")
        if nc not in (True, False):  # 0 / 1 after a round trip through an array
            raise ValueError(f"norm_correction must be a bool, got {nc!r}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        try:  # built-in names must agree with their bits; plugin names carry them
            scheme = parse_scheme(name)
        except ValueError:
            scheme = None
        if scheme is not None and (scheme.key_bits, scheme.value_bits) != (kb, vb):
            raise ValueError(f"scheme {name!r} does not match key_bits={kb}, value_bits={vb}")
        window = 0 if scheme is None else scheme.window  # a built-in name carries it
        self.scheme = KVScheme(name, kb, vb, bool(nc), seed, window)
        for field, x in (("layer_index", layer), ("offset", offset)):
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ValueError(f"{field} must be a non-negative int, got {x!r}")
        for field, x in (("k_dim", k_dim), ("v_dim", v_dim)):
            if x is not None and (isinstance(x, bool) or not isinstance(x, int)
                                  or not 0 < x <= MAX_HEAD_DIM):  # fmt: skip
                raise ValueError(f"{field} must be an int in [1, {MAX_HEAD_DIM}], got {x!r}")
        self.layer_index, self.offset = layer, offset
        self.k_dim, self.v_dim = k_dim, v_dim
        if dtype is None:
            self.dtype = None
        elif dtype in ("float16", "bfloat16", "float32"):
            self.dtype = getattr(mx, dtype)
        else:
            raise ValueError(f"cache dtype must be float16, bfloat16 or float32, got {dtype!r}")

    def _set_arrays(self, arrays):
        arrays = [None if a is None or (isinstance(a, mx.array) and a.size == 0) else a
                  for a in arrays]  # fmt: skip
        keys, key_norms, values, value_norms = arrays[:4]
        self.keys, self.key_norms, self.values, self.value_norms = keys, key_norms, values, value_norms
        self.recent_keys, self.recent_values = (arrays[4:] + [None, None])[:2]
        if not USES_META_STATE or self.k_dim is not None:
            self._validate()

    def _validate(self):
        """Check the arrays against the scalars, so a corrupt file fails here with a
        clear message instead of deep inside attention."""
        if self.values is None:
            if self.offset != 0 or self.keys is not None:
                raise ValueError("TurboQuantKVCache state has no values but claims tokens")
            return
        if self.k_dim is None or self.v_dim is None or self.dtype is None:
            raise ValueError("TurboQuantKVCache state has arrays but no head dims / dtype")
        if not isinstance(self.values, mx.array) or self.values.ndim != 4:
            raise ValueError("TurboQuantKVCache values must be a [B, H_kv, T, words] array")
        B, H, T = self.values.shape[:3]
        if self.offset > T:
            raise ValueError(f"offset {self.offset} is beyond the {T} tokens stored")
        # Word counts from the dims alone: no codec is built from unchecked data.
        expected = {"values": ((B, H, T, packed_words(self.v_dim, self.scheme.value_bits)), mx.uint32),
                    "value_norms": ((B, H, T), mx.float16)}  # fmt: skip
        if self.scheme.key_bits == 0:
            expected["keys"] = ((B, H, T, self.k_dim), self.dtype)
        else:
            words = packed_words(self.k_dim, self.scheme.key_bits)
            expected["keys"] = ((B, H, T, words), mx.uint32)
            expected["key_norms"] = ((B, H, T), mx.float16)
        for name, (shape, dtype) in expected.items():
            a = getattr(self, name)
            if not isinstance(a, mx.array):
                raise ValueError(f"TurboQuantKVCache {name} is missing or not an array")
            if tuple(a.shape) != shape or a.dtype != dtype:
                raise ValueError(
                    f"TurboQuantKVCache {name} has shape {tuple(a.shape)} and dtype {a.dtype}; "
                    f"scheme {self.scheme.name} with D_k={self.k_dim}, D_v={self.v_dim} "
                    f"needs {shape} {dtype}"
                )
        if self.scheme.key_bits == 0 and self.key_norms is not None:
            raise ValueError("fp16-key TurboQuantKVCache state must not carry key norms")
        self._validate_recent(B, H)

    def _validate_recent(self, B, H):
        # Batch caches build single views with __new__: no window attributes there.
        rk, rv = getattr(self, "recent_keys", None), getattr(self, "recent_values", None)
        if rk is None and rv is None:
            return
        if not (isinstance(rk, mx.array) and isinstance(rv, mx.array)):
            raise ValueError("TurboQuantKVCache recent keys and values must both be arrays")
        r = rk.shape[2] if rk.ndim == 4 else -1
        if r > min(self.scheme.window, self.offset) or (
            tuple(rk.shape), tuple(rv.shape)) != ((B, H, r, self.k_dim), (B, H, r, self.v_dim)
        ) or rk.dtype != self.dtype or rv.dtype != self.dtype:  # fmt: skip
            raise ValueError(
                f"TurboQuantKVCache recent keys {tuple(rk.shape)} / values {tuple(rv.shape)} "
                f"({rk.dtype}) do not fit a window of {self.scheme.window} over {self.offset} "
                f"tokens, D_k={self.k_dim}, D_v={self.v_dim}, dtype {self.dtype}"
            )

    @classmethod
    def from_state(cls, state, meta_state=None):
        obj = cls.__new__(cls)
        obj.keys = obj.key_norms = obj.values = obj.value_norms = None
        obj.recent_keys = obj.recent_values = None
        obj._dtype = None
        obj.scheme = parse_scheme("turbo4")  # replaced by the state's scalars
        if meta_state is not None:
            obj.meta_state = meta_state
        obj.state = state
        return obj
