"""Attention and encode ops on the packed cache: pure-MLX twins in ``reference.py``, fused
kernels per backend in ``cuda.py`` and ``metal.py`` (same op names in each).

Dispatch rule, one place for every op:
  * ``MLX_TQ_KERNELS`` = ``auto`` (default: the backend mlx runs on), ``reference`` (never a
    fused kernel), ``cuda`` or ``metal`` (that backend if mlx has it, else the reference).
  * Shapes a kernel does not cover (e.g. prefill with more than 8 queries, head dims not a
    multiple of 32) take the pure-MLX path silently: that is by design, not a failure.
  * A kernel that fails to build or run is switched off for the process and the op takes the
    pure-MLX path, with exactly one ``RuntimeWarning`` per (backend, op). mlx builds a kernel
    lazily, so the first call of each kernel configuration (a new entry in ``launch``'s
    memoized set-ups) is evaluated eagerly inside the guard; later calls stay lazy.
  * A decode step repeating a cache's last in-place encode or attention replays it from the
    cache's :class:`Lane` without this dispatch, only while the same backend serves.
"""

import importlib
import os
import warnings

import mlx.core as mx

from ..codec.packing import token_rows
from . import launch

ENV = "MLX_TQ_KERNELS"
CHOICES = ("auto", "reference", "cuda", "metal")
BACKENDS = ("cuda", "metal")
OPS = ("decode_attention", "encode", "encode_kv", "encode_rows", "append_rows")

_disabled = set()  # (backend, op) that failed once


_CHOICES = {}  # raw MLX_TQ_KERNELS value -> its choice (decode reads it twice per layer)


def choice() -> str:
    raw = os.environ.get(ENV, "auto")
    value = _CHOICES.get(raw)
    if value is None:
        value = raw.strip().lower() or "auto"
        if value not in CHOICES:
            raise ValueError(f"{ENV}={value!r}; allowed: {', '.join(CHOICES)}")
        _CHOICES[raw] = value
    return value


def backend_module(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; allowed: {', '.join(BACKENDS)}")
    return importlib.import_module(f"{__name__}.{name}")


_resolved = {}  # MLX_TQ_KERNELS value -> backend module or None (decode calls this per layer)


def active_backend():
    """The backend module whose kernels run now, or None for the pure-MLX path."""
    want = choice()
    if want not in _resolved:
        _resolved[want] = None
        if want != "reference":
            for name in BACKENDS if want == "auto" else (want,):
                module = backend_module(name)
                if module.available():
                    _resolved[want] = module
                    break
    return _resolved[want]


def _serving(op: str):
    """The backend module that runs ``op`` now, or None (no backend, or the op failed)."""
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; allowed: {', '.join(OPS)}")
    module = active_backend()
    if module is None or (module.NAME, op) in _disabled:
        return None
    return module


def get_op(op: str):
    """The fused implementation of ``op`` for the active backend, or None."""
    module = _serving(op)
    return None if module is None else getattr(module, op)


def run(op: str, *args, **kwargs):
    """Run the fused ``op`` and return its result, or None where the caller should take the
    pure-MLX path (no backend, shapes not covered, or the kernel failed: one warning)."""
    if not all(getattr(a, "plain", True) for a in args):  # prod / split / window formats
        return None
    module = _serving(op)
    if module is None:
        return None
    backend = module.NAME
    built = launch.builds
    try:
        result = getattr(module, op)(*args, **kwargs)
        if result is not None and launch.builds != built:  # a configuration's first call
            mx.eval(result)
        if result is not None and op in _LANE_OPS:
            _bind_lane(module, op, args, kwargs)
        return result
    except Exception as err:  # a build or launch failure on this machine
        _disabled.add((backend, op))
        launch.epoch += 1  # lanes bound to the failed kernel go stale
        warnings.warn(
            f"mlx-lm-turboquant: the {backend} '{op}' kernel failed ({type(err).__name__}: "
            f"{err}); using the pure-MLX path from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


class Lane:
    """A cache's way past the dispatcher for decode steps, which repeat one configuration
    per layer: the backend that served the cache's last in-place encode and attention, and
    the launch set-ups they used (``launch.replay_append`` / ``replay_attention``, which
    check what changes per step). Stale once the backend serving now, ``launch.epoch``
    (reset, a kernel switched off) or the backend's ``COMPILED`` differ. Saves most of the
    host time of the dispatch per layer (docs/kernels.md)."""

    __slots__ = ("module", "epoch", "compiled", "chain", "append", "attention")

    def __init__(self, module, chain):
        self.module, self.chain = module, chain
        self.epoch, self.compiled = launch.epoch, getattr(module, "COMPILED", None)
        self.append = self.attention = None

    def current(self) -> bool:
        return (
            self.epoch == launch.epoch
            and active_backend() is self.module
            and getattr(self.module, "COMPILED", None) == self.compiled
        )


_LANE_OPS = ("append_rows", "decode_attention")


def _bind_lane(module, op, args, kwargs):
    """After ``op`` ran on a cache: keep the set-up it recorded in the cache's lane."""
    cache = args[4] if op == "append_rows" else args[1]
    if not hasattr(cache, "_lane"):
        return
    lane = cache._lane
    if lane is None or lane.module is not module or not lane.current():
        lane = cache._lane = Lane(module, launch._chain(cache))
    if op == "append_rows":
        lane.append = lane.chain.append  # this call's, or None
    elif kwargs.get("mask") is None and kwargs.get("sinks") is None and lane.chain.fast:
        replay = lane.chain.fast[-1]  # None where the set-up may not be replayed
        if replay is not None and replay[0] == args[0].shape and replay[3] is cache._packed:
            lane.attention = replay  # this call's (an earlier one's has other rows)


def fast_append(cache, keys, values):
    """``append_rows`` by the cache's lane: the ``done`` array, or None (take the full path)."""
    lane = cache._lane
    if lane is None or lane.append is None or not lane.current():
        return None
    return launch.replay_append(lane.append, lane.chain, cache, keys, values)


def fast_attention(cache, queries, scale):
    """``decode_attention`` without mask or sinks by the cache's lane, or None."""
    lane = cache._lane
    if lane is None or lane.attention is None or not lane.current():
        return None
    return launch.replay_attention(lane.attention, lane.chain, cache, queries, scale)


def reset():
    """Forget failures and set-up configurations (tests, or after changing
    ``MLX_TQ_KERNELS``): the next call of each configuration is evaluated eagerly again."""
    _disabled.clear()
    _resolved.clear()
    launch.forget_configurations()


def encode(codec, x):
    """``codec.encode(x)`` through the fused kernel where one runs, else its pure twin."""
    out = run("encode", codec, x)
    return codec.encode(x) if out is None else out


def encode_kv(key_codec, keys, value_codec, values):
    """``(*key_codec.encode(keys), *value_codec.encode(values))`` in one fused launch where
    one runs, else through :func:`encode` for each."""
    out = run("encode_kv", key_codec, keys, value_codec, values)
    if out is None:
        return (*encode(key_codec, keys), *encode(value_codec, values))
    return out


def encode_rows(key_codec, keys, value_codec, values):
    """``codec.packing.token_rows`` of both encodes: one launch where a kernel runs."""
    out = run("encode_rows", key_codec, keys, value_codec, values)
    if out is None:
        return token_rows(*encode_kv(key_codec, keys, value_codec, values))
    return out


def append_rows(key_codec, keys, value_codec, values, cache):
    """Encode ``keys`` and ``values`` into ``cache``'s token rows in place at row
    ``cache.offset`` (``launch.append_rows``): the launch's ``done`` array, or None where no
    backend does this (then the caller encodes and updates the rows itself)."""
    return run("append_rows", key_codec, keys, value_codec, values, cache)
