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
from .codec import codec_for
from .codec.centring import RopeFrame, key_mean, mean_keys
from .codec.packing import split_rows, token_rows
from .codec.split import inverse_order, outlier_channels, permute
from .config import VARIANTS, KVScheme, parse_scheme

# mlx-lm <= 0.32.0 keeps scalars in `meta_state` (strings) and calls
# `from_state(state, meta_state)`; 0.32.2 stores Python scalars inside `state`.
USES_META_STATE = hasattr(_BaseCache, "meta_state")

# Bounds on what a loaded prompt-cache file may claim, checked before any codec is
# built from it (a codec for dimension D holds a D x D rotation).
MAX_HEAD_DIM = 4096
MAX_NAME = 64

_STATE_FIELDS = (
    "scheme", "key_bits", "value_bits", "norm_correction", "seed",
    "layer_index", "offset", "k_dim", "v_dim", "dtype", "variant",
)  # fmt: skip
# Files written before the variant field existed: 10 scalars, variant "mse", no channels.
_LEGACY_FIELDS = len(_STATE_FIELDS) - 1
_CHANNELS = ("key_channels", "value_channels")


@lru_cache(maxsize=None)  # looked up for every layer at every decode step
def layer_seed(base_seed: int, layer_index: int, kind: int) -> int:
    """A rotation seed per (layer, keys=0 / values=1), stable across runs and platforms."""
    return int(np.random.SeedSequence([base_seed, layer_index, kind]).generate_state(1)[0])


def check_channel_order(name: str, channels: mx.array):
    """Each head's channel order must be a permutation of 0..D-1 (a loaded file could hold
    anything, and a gather with a repeated index would silently drop a channel)."""
    order = np.sort(np.array(channels), axis=-1)
    if not (order == np.arange(order.shape[-1])).all():
        raise ValueError(f"{name} must hold a permutation of each head's channels")


def check_rope_frame(scheme: KVScheme, frame):
    """A centred scheme needs the layer's :class:`RopeFrame`; other schemes take none."""
    if scheme.centre_keys and not isinstance(frame, RopeFrame):
        raise ValueError(
            f"scheme {scheme.name!r} centres keys in RoPE's frame and needs the layer's "
            f"rope_frame (codec.centring.probe_rope; make_prompt_cache finds it), got {frame!r}"
        )
    if not scheme.centre_keys and frame is not None:
        raise ValueError(f"scheme {scheme.name!r} does not centre keys; pass no rope_frame")


def array_or_none(a):
    """A state entry: None and the empty arrays that stand for None (old mlx-lm) are None."""
    return None if a is None or (isinstance(a, mx.array) and a.size == 0) else a


def take_head_dims(cache, keys, values):
    """Adopt the head dims and dtype of the first ``keys`` / ``values`` a cache (single or
    batch) sees, and check later ones against them."""
    k_dim, v_dim = keys.shape[-1], values.shape[-1]
    if cache.k_dim is None:
        cache.k_dim, cache.v_dim, cache.dtype = k_dim, v_dim, keys.dtype
    elif (k_dim, v_dim) != (cache.k_dim, cache.v_dim):
        raise ValueError(
            f"head dims changed: cache holds D_k={cache.k_dim}, D_v={cache.v_dim}, "
            f"got keys {keys.shape} and values {values.shape}"
        )


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
        key_norms: ``[B, H_kv, T]`` float16 (None when key_bits == 0); ``[B, H_kv, T, 2]``
            for prod keys (MSE scale, residual norm) and split schemes (one per half).
        values: ``[B, H_kv, T, words_v]`` uint32.
        value_norms: ``[B, H_kv, T]`` float16; ``[B, H_kv, T, 2]`` for split schemes.
        key_channels, value_channels: split schemes only, ``[B, H_kv, D]`` int32: each head's
            channel order, outliers first, chosen from the first tokens the cache sees.
        recent_keys, recent_values: ``[B, H_kv, r, D]`` in the model's dtype, the last
            ``r <= scheme.window`` tokens uncompressed (None without a window). Those tokens
            are stored packed too; attention reads them from here.
        key_mean: centred schemes only, ``[B, H_kv, 1, D_k]`` float32: the mean of the first
            update's keys with RoPE undone (``codec.centring``); the keys are stored less its
            image at their position, ``rope_frame`` (a :class:`RopeFrame`) turning it there.
        packed: plain schemes (:attr:`plain`, code keys) keep the four token arrays as one,
            ``[B, H_kv, T, words_k + words_v + 1]`` uint32 (``codec.packing.token_rows``:
            the same bytes), so a decode step updates one buffer instead of four; the four
            attributes above then read out of it. None otherwise.
    """

    step = 256
    key_channels = value_channels = None  # also for instances made by __new__
    key_mean = rope_frame = None
    _packed = None
    # Rows written in place by the last fused encode (its `done` array; see _append_rows)
    # and whether anything outside the cache's own launches may hold the rows buffer.
    _pending = None
    _exposed = True
    _lane = None  # kernels.Lane: decode steps' way past the dispatcher (never copied)
    _keys = _key_norms = _values = _value_norms = None
    # Whether new caches of this class keep token rows; the sliding-window subclass writes
    # its four arrays in place, so it keeps them apart.
    packs_rows = True

    def __init__(self, scheme="turbo4", layer_index: int = 0, rope_frame: RopeFrame = None):
        self.scheme: KVScheme = parse_scheme(scheme)
        if isinstance(layer_index, bool) or not isinstance(layer_index, int) or layer_index < 0:
            raise ValueError(f"layer_index must be a non-negative int, got {layer_index!r}")
        check_rope_frame(self.scheme, rope_frame)
        self.layer_index = layer_index
        self.rope_frame, self.key_mean = rope_frame, None
        self.offset = 0
        self.keys = self.key_norms = self.values = self.value_norms = None
        self.key_channels = self.value_channels = None
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

    # -- stored arrays: four attributes, read out of ``packed`` when rows are kept -------

    @property
    def packed(self):
        """The token rows (see the class docstring), or None. Reading them here waits for
        rows a fused encode wrote in place, and marks the buffer as seen from outside: the
        next update then goes through a slice update, which copies it where it is still
        held (mlx's own rule), instead of writing into it."""
        self._settle()
        if self._packed is not None:
            self._exposed = True
        return self._packed

    @packed.setter
    def packed(self, rows):
        self._settle()
        self._packed, self._exposed = rows, True

    def _settle(self):
        """Evaluate the pending in-place encode: mlx orders GPU work by data, and readers
        other than this cache's own launches do not depend on it."""
        if self._pending is not None:
            mx.eval(self._pending)
            self._pending = None

    def __getstate__(self):
        # copy.copy / deepcopy / pickle: the rows must hold every token, and a shallow copy
        # would share the buffer, so neither cache may write into it in place any more.
        self._settle()
        self._exposed = True
        state = self.__dict__.copy()
        state.pop("_lane", None)  # bound to this cache's launches
        return state

    def _key_words(self):
        return self.scheme.vector_format("keys", self.k_dim)[0]

    def _unpack(self):
        """Switch to four separate arrays (any assignment to one of them does this first)."""
        if self.packed is not None:
            rows, self.packed = self.packed, None
            self._keys, self._key_norms, self._values, self._value_norms = split_rows(
                rows, self._key_words()
            )

    def _stored(index, name):  # noqa: N805 (a property factory, run in the class body)
        def get(self):
            if self.packed is None:
                return getattr(self, name)
            return split_rows(self.packed, self._key_words())[index]

        def set(self, value):
            self._unpack()
            setattr(self, name, value)

        return property(get, set)

    keys = _stored(0, "_keys")
    key_norms = _stored(1, "_key_norms")
    values = _stored(2, "_values")
    value_norms = _stored(3, "_value_norms")
    del _stored

    def _rows_format(self) -> bool:
        """Whether this cache's class and format may keep token rows (plain code keys)."""
        return self.packs_rows and self.plain and self.scheme.key_bits > 0

    def _keeps_rows(self) -> bool:
        """Whether updates go to ``packed``: already there, or a new cache that may."""
        return self._packed is not None or (self._values is None and self._rows_format())

    # -- codecs -----------------------------------------------------------------

    @property
    def key_codec(self):
        s = self.scheme
        if s.key_bits == 0 or self.k_dim is None:
            return None
        seed = layer_seed(s.seed, self.layer_index, 0)
        return codec_for(s.variant, self.k_dim, s.key_bits, seed, s.norm_correction)

    @property
    def value_codec(self):
        s = self.scheme
        if self.v_dim is None:
            return None
        seed = layer_seed(s.seed, self.layer_index, 1)
        variant = "split" if s.variant == "split" else "mse"  # prod is for keys only
        return codec_for(variant, self.v_dim, s.value_bits, seed, s.norm_correction)

    @property
    def plain(self) -> bool:
        """Whether the fused kernels read this cache's format (plain MSE codes, no
        recent-token window; centred keys are read with their mean)."""
        s = self.scheme
        return s.variant == "mse" and not s.window

    # -- the mlx-lm cache protocol ----------------------------------------------

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Compress and append ``keys`` ``[B, H_kv, L, D_k]`` and ``values`` ``[B, H_kv, L, D_v]``."""
        if self._lane is not None and not self._exposed and not self.scheme.centre_keys:
            # A decode step repeating the last one: its set-up replayed (kernels.Lane).
            done = kernels.fast_append(self, keys, values)
            if done is not None:
                self._wrote_in_place(done, keys.shape[2])
                return self._handles(keys.shape[0], keys.shape[1], self.offset)
        take_head_dims(self, keys, values)
        stored_keys = self._centred(keys) if self.scheme.centre_keys else keys
        if self._keeps_rows():
            self._append_rows(stored_keys, values)
        else:
            self._append(stored_keys, values)
        if self.scheme.window:
            self._keep_recent(keys, values)
        return self._handles(keys.shape[0], keys.shape[1], self.offset)

    def _handles(self, B, n_kv_heads, T):
        """``(keys, values)`` handles on the first ``T`` tokens (:class:`CompressedKV`)."""
        return (
            CompressedKV(self, "keys", (B, n_kv_heads, T, self.k_dim), self.dtype),
            CompressedKV(self, "values", (B, n_kv_heads, T, self.v_dim), self.dtype),
        )

    def _append_rows(self, keys, values):
        key_codec, value_codec = self.key_codec, self.value_codec
        if not self._exposed:
            # Decode: the fused encode writes the rows into the buffer itself; no slice
            # update, which costs more host time than the launch (docs/kernels.md).
            done = kernels.append_rows(key_codec, keys, value_codec, values, self)
            if done is not None:
                self._wrote_in_place(done, keys.shape[2])
                return
        rows = kernels.encode_rows(key_codec, keys, value_codec, values)
        prev, L = self.offset, keys.shape[2]
        self._settle()
        if self._packed is None or prev + L > self._packed.shape[2]:
            self._packed = self._grown(self._packed, prev, L, rows)
        self.offset += L
        self._packed[:, :, prev : self.offset] = rows  # one slice update (in place in mlx)
        self._exposed = False  # a buffer of this cache's own now: later updates may write it

    def _wrote_in_place(self, done, L):
        """A fused encode wrote ``L`` tokens' rows in place: ``done`` is pending until read."""
        self._pending = done
        self.offset += L

    def _append(self, keys, values):
        L = keys.shape[2]
        new_keys, new_key_norms, new_values, new_value_norms = self.encode_tokens(keys, values)
        prev = self.offset
        if self.keys is None or prev + L > self.keys.shape[2]:
            self._grow(prev, L, new_keys, new_key_norms, new_values, new_value_norms)
        self.offset += L
        # Static slices: mlx updates the buffers in place (a slice update with an array
        # start copied them on CUDA, measured).
        self.keys[:, :, prev : self.offset] = new_keys
        self.values[:, :, prev : self.offset] = new_values
        if new_key_norms is not None:
            self.key_norms[:, :, prev : self.offset] = new_key_norms
        self.value_norms[:, :, prev : self.offset] = new_value_norms

    def _centred(self, keys):
        """``keys`` less the key mean turned to their positions; the first update sets
        the mean (``codec.centring``)."""
        if self.key_mean is None:
            self.rope_frame.check_fits(keys.shape[-1])  # later keys have the same dims
            self.key_mean = key_mean(keys, self.rope_frame, self.offset)
        shift = mean_keys(self.key_mean, self.rope_frame, self.offset, keys.shape[2])
        return (keys.astype(mx.float32) - shift).astype(keys.dtype)

    def mean_key_block(self, start: int, stop: int):
        """``[B, H_kv, stop - start, D_k]`` float32: what a centred cache adds back to the
        keys at positions ``start .. stop - 1``; None when keys are not centred."""
        if self.key_mean is None:
            return None
        return mean_keys(self.key_mean, self.rope_frame, start, stop - start)

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
        if self.scheme.variant == "split":
            if self.key_channels is None:  # the first tokens decide, then stay fixed
                weights = self._token_weights(keys.shape[2])
                self.key_channels = outlier_channels(keys, weights)
                self.value_channels = outlier_channels(values, weights)
            keys, values = permute(keys, self.key_channels), permute(values, self.value_channels)
        return kernels.encode_kv(self.key_codec, keys, self.value_codec, values)

    def _token_weights(self, L):
        """Which of the ``L`` new tokens are real (``[B, L]``), or None when all are."""
        return None

    def _grow(self, prev, L, *new):
        """Allocate room for at least ``L`` more tokens, in whole steps.

        The old contents are copied once per step (as in mlx-lm's KVCache), never
        per token.
        """
        names = ("keys", "key_norms", "values", "value_norms")
        for name, like in zip(names, new):
            if like is not None:
                setattr(self, name, self._grown(getattr(self, name), prev, L, like))

    def _grown(self, old, prev, L, like):
        """``old`` (or nothing) with room for ``L`` more tokens after ``prev``: the capacity
        grows to the next multiple of ``step`` (256 rows), so every head's rows start 16-byte
        aligned (what the tensor-core kernel's bulk copies need to take them whole)."""
        shape = list(like.shape)
        shape[2] = -(-(prev + L) // self.step) * self.step - prev
        extra = mx.zeros(shape, like.dtype)
        return extra if old is None else mx.concatenate([old[:, :, :prev], extra], axis=2)

    def keys_and_values(self):
        """Handles on the cached keys and values (models that share one layer's KV with
        later layers read them this way; attention on them goes through the dispatcher)."""
        rows = self._packed if self._packed is not None else self.values  # shapes only: no wait
        return self._handles(rows.shape[0], rows.shape[1], self.attended_tokens)

    @property
    def attended_tokens(self) -> int:
        """How many tokens attention reads: the first ``attended_tokens`` rows of the stored
        arrays. Equal to ``offset`` here; a sliding-window cache reads at most its window."""
        return self.offset

    def size(self):
        return self.offset

    def empty(self):
        return self._packed is None and self._values is None

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

    def buffers(self):
        """The arrays this cache holds, whatever their layout (e.g. to evaluate them)."""
        frame = None if self.rope_frame is None else self.rope_frame.freqs
        arrays = (self.packed, self._keys, self._key_norms, self._values, self._value_norms,
                  self.key_channels, self.value_channels,
                  self.recent_keys, self.recent_values, self.key_mean, frame)  # fmt: skip
        return [a for a in arrays if a is not None]

    @property
    def nbytes(self):
        """Bytes of the arrays this cache holds (capacity included, like KVCache)."""
        return sum(a.nbytes for a in self.buffers())

    def bytes_per_token(self) -> int:
        """Bytes one token costs in this layer; 0 before the first update."""
        if self.k_dim is None:
            return 0
        return self.scheme.bytes_per_token(self.keys.shape[1], self.k_dim, self.v_dim)

    # -- reading the data back --------------------------------------------------

    def fetch(self):
        """The part of the stored arrays attention reads: ``(keys, key_norms, values, value_norms)``."""
        T = self.attended_tokens
        key_norms = None if self.key_norms is None else self.key_norms[:, :, :T]
        return (self.keys[:, :, :T], key_norms, self.values[:, :, :T], self.value_norms[:, :, :T])

    def dequantize(self, dtype=mx.float32):
        """Keys ``[B, H_kv, T, D_k]`` and values ``[B, H_kv, T, D_v]`` in the original basis
        (``T`` = ``attended_tokens``, in storage order). For tests and debugging: attention never needs this."""
        keys, key_norms, values, value_norms = self.fetch()
        if self.scheme.key_bits == 0:
            keys = keys.astype(dtype)
        else:
            keys = self.key_codec.decode(keys, key_norms, dtype)
        values = self.value_codec.decode(values, value_norms, dtype)
        if self.scheme.variant == "split":  # back from outliers-first order
            keys = permute(keys, inverse_order(self.key_channels))
            values = permute(values, inverse_order(self.value_channels))
        shift = self.mean_key_block(0, keys.shape[2])  # in the model's channel order
        if shift is not None:
            keys = (keys.astype(mx.float32) + shift).astype(dtype)
        if self.recent is not None:  # what attention reads for the last tokens
            r = self.recent_keys.shape[2]
            old = self.offset - r
            keys = mx.concatenate([keys[:, :, :old], self.recent_keys.astype(dtype)], 2)
            values = mx.concatenate([values[:, :, :old], self.recent_values.astype(dtype)], 2)
        return keys, values

    # -- serialization ----------------------------------------------------------

    _state_fields = _STATE_FIELDS  # the scalars after the 4 arrays, in order

    def _stored_arrays(self):
        """The arrays ``state`` saves: the used part (a sliding window saves its buffer)."""
        return self.fetch()

    def _scalars(self):
        s = self.scheme
        return (
            s.name, s.key_bits, s.value_bits, s.norm_correction, s.seed,
            self.layer_index, self.offset, self.k_dim, self.v_dim, self._dtype, s.variant,
        )  # fmt: skip

    def _centring_state(self):
        """The key mean and the RoPE frame (centred schemes), else nothing."""
        if not self.scheme.centre_keys:
            return ()
        return (self.key_mean, self.rope_frame.to_array())

    @property
    def state(self):
        """The four token arrays, then (new mlx-lm) the scalars, then the two channel
        orders (None unless the scheme splits channels), then a window's recent keys and
        values, then a centred scheme's key mean and RoPE frame."""
        if self.keys is None:
            arrays = (None, None, None, None)
        else:
            arrays = self._stored_arrays()
        channels = (self.key_channels, self.value_channels)
        recent = (self.recent_keys, self.recent_values) if self.scheme.window else ()
        extra = recent + self._centring_state()
        if USES_META_STATE:
            arrays += channels if self.scheme.variant == "split" else ()
            return tuple(a if a is not None else mx.array([]) for a in arrays + extra)
        return arrays + self._scalars() + channels + extra

    @state.setter
    def state(self, v):
        v, name = list(v), type(self).__name__
        n = 4 + len(self._state_fields) + 2
        # Only the plain cache has files from before the variant field.
        has_legacy = self._state_fields is _STATE_FIELDS
        if USES_META_STATE:  # the scalars (and so the scheme) came first, in meta_state
            split = self.scheme.variant == "split"
            n = 4 + 2 * split + self._extra_items()
            if len(v) != n:
                raise ValueError(f"{name} state holds {n} arrays, got {len(v)} items")
            arrays, channels, extra = v[:4], v[4:6] if split else [None, None], v[4 + 2 * split :]
        elif has_legacy and len(v) == 4 + _LEGACY_FIELDS:  # before the variant field
            arrays, channels, extra = v[:4], [None, None], []
            self._set_scalars(v[4:] + ["mse"])
        else:
            # + 2: a recent-token window's keys and values; + 2: a centred key mean and frame
            if len(v) not in (n, n + 2, n + 4):
                old = f" (or {4 + _LEGACY_FIELDS} from older files)" if has_legacy else ""
                raise ValueError(f"{name} state holds {n} items, 2 or 4 more with a recent-"
                                 f"token window or centred keys{old}, got {len(v)}")  # fmt: skip
            arrays, channels, extra = v[:4], v[n - 2 : n], v[n:]
            self._set_scalars(v[4 : n - 2])
            if len(extra) != self._extra_items():
                raise ValueError(f"scheme {self.scheme.name!r} does not match a state of "
                                 f"{len(v)} items")  # fmt: skip
        self.key_channels, self.value_channels = map(array_or_none, channels)
        recent = extra[:2] if self.scheme.window else [None, None]
        self.recent_keys, self.recent_values = map(array_or_none, recent)
        self._set_centring(*(extra[-2:] if self.scheme.centre_keys else [None, None]))
        self._set_arrays(arrays)

    def _extra_items(self) -> int:
        """State items after the channel orders: a window's 2, a centred scheme's 2."""
        return 2 * bool(self.scheme.window) + 2 * self.scheme.centre_keys

    def _set_centring(self, mean, frame):
        mean, frame = array_or_none(mean), array_or_none(frame)
        if self.scheme.centre_keys:
            if frame is None:
                raise ValueError(f"scheme {self.scheme.name!r} centres keys; its state must "
                                 "carry the RoPE frame")  # fmt: skip
            frame = RopeFrame.from_array(frame, self.k_dim or MAX_HEAD_DIM)
        self.key_mean, self.rope_frame = mean, frame

    @property
    def meta_state(self):
        return tuple("" if x is None else str(x) for x in self._scalars())

    @meta_state.setter
    def meta_state(self, v):
        v = list(v)
        if self._state_fields is _STATE_FIELDS and len(v) == _LEGACY_FIELDS:
            v.append("mse")
        if len(v) != len(self._state_fields):
            raise ValueError(f"meta_state holds {len(self._state_fields)} strings, got {len(v)}")
        self._set_scalars(self._parse_meta(v))

    @staticmethod
    def _parse_meta(v):
        """The scalars of ``_STATE_FIELDS`` back from their ``meta_state`` strings."""
        fields = v[: len(_STATE_FIELDS)]
        name, kb, vb, nc, seed, layer, offset, k_dim, v_dim, dtype, variant = fields
        as_int = lambda x: None if x in ("", "None") else int(x)  # noqa: E731
        return (name, int(kb), int(vb), nc == "True", int(seed), int(layer),
                int(offset), as_int(k_dim), as_int(v_dim), dtype or None, variant)  # fmt: skip

    def _set_scalars(self, values):
        name, kb, vb, nc, seed, layer, offset, k_dim, v_dim, dtype, variant = values
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise ValueError(f"scheme name must be a string of 1 to {MAX_NAME} characters")
        for field, x in (("key_bits", kb), ("value_bits", vb), ("seed", seed)):
            if isinstance(x, bool) or not isinstance(x, int):
                raise ValueError(f"{field} must be an int, got {x!r}")
        if nc not in (True, False):  # 0 / 1 after a round trip through an array
            raise ValueError(f"norm_correction must be a bool, got {nc!r}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        try:  # built-in names must agree with their bits; plugin names carry them
            scheme = parse_scheme(name)
        except ValueError:
            scheme = None
        if scheme is not None and (scheme.key_bits, scheme.value_bits, scheme.variant) != (
            kb, vb, variant
        ):
            raise ValueError(
                f"scheme {name!r} does not match key_bits={kb}, value_bits={vb}, "
                f"variant={variant!r}"
            )
        # A built-in name carries its window and centring.
        window = 0 if scheme is None else scheme.window
        centre = False if scheme is None else scheme.centre_keys
        self.scheme = KVScheme(name, kb, vb, bool(nc), seed, variant, window, centre)
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
        keys, key_norms, values, value_norms = map(array_or_none, arrays)
        self.keys, self.key_norms, self.values, self.value_norms = keys, key_norms, values, value_norms
        if not USES_META_STATE or self.k_dim is not None:
            self._validate()
            self._pack_rows()

    def _pack_rows(self):
        """Keep a loaded plain cache as token rows too (decode then updates one buffer)."""
        if self._packed is None and self._values is not None and self._rows_format():
            rows = token_rows(self._keys, self._key_norms, self._values, self._value_norms)
            self._keys = self._key_norms = self._values = self._value_norms = None
            self.packed = rows

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
        self._check_positions(T)
        # Word counts from the dims alone: no codec is built from unchecked data.
        def norms_shape(n):
            return (B, H, T) if n == 1 else (B, H, T, n)

        words, norms = self.scheme.vector_format("values", self.v_dim)
        expected = {"values": ((B, H, T, words), mx.uint32),
                    "value_norms": (norms_shape(norms), mx.float16)}  # fmt: skip
        if self.scheme.key_bits == 0:
            expected["keys"] = ((B, H, T, self.k_dim), self.dtype)
        else:
            words, norms = self.scheme.vector_format("keys", self.k_dim)
            expected["keys"] = ((B, H, T, words), mx.uint32)
            expected["key_norms"] = (norms_shape(norms), mx.float16)
        if self.scheme.variant == "split":
            expected["key_channels"] = ((B, H, self.k_dim), mx.int32)
            expected["value_channels"] = ((B, H, self.v_dim), mx.int32)
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
        if self.scheme.variant == "split":
            for name in _CHANNELS:
                check_channel_order(name, getattr(self, name))
        elif self.key_channels is not None or self.value_channels is not None:
            raise ValueError(f"scheme {self.scheme.name} does not split channels; "
                             "its state must not carry channel orders")  # fmt: skip
        self._validate_recent(B, H)
        self._validate_centring(B, H)

    def _validate_centring(self, B, H):
        mean = self.key_mean
        if not self.scheme.centre_keys:
            if mean is not None or self.rope_frame is not None:
                raise ValueError(f"scheme {self.scheme.name} does not centre keys; its state "
                                 "must not carry a key mean or RoPE frame")  # fmt: skip
            return
        self.rope_frame.check_fits(self.k_dim)
        if self.offset and (not isinstance(mean, mx.array) or tuple(mean.shape) != (
                B, H, 1, self.k_dim) or mean.dtype != mx.float32):  # fmt: skip
            raise ValueError(
                f"TurboQuantKVCache key mean must be a [{B}, {H}, 1, {self.k_dim}] float32 array "
                f"once tokens are stored, got "
                f"{None if mean is None else (tuple(mean.shape), mean.dtype)}"
            )

    def _check_positions(self, T: int):
        """The position scalars against the ``T`` tokens stored."""
        if self.offset > T:
            raise ValueError(f"offset {self.offset} is beyond the {T} tokens stored")

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
        obj.key_channels = obj.value_channels = None
        obj.recent_keys = obj.recent_values = None
        obj.key_mean = obj.rope_frame = None
        obj._dtype = None
        obj.scheme = parse_scheme("turbo4")  # replaced by the state's scalars
        if meta_state is not None:
            obj.meta_state = meta_state
        obj.state = state
        return obj
