"""The token-row layout: plain caches keep codes and norms of keys and values in one array
(one slice update per step), and read out exactly what four separate arrays would hold."""

import copy
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_turboquant import TurboQuantKVCache, turboquant_sdpa
from mlx_lm_turboquant.rotating_cache import RotatingTurboQuantKVCache
from mlx_lm_turboquant.codec.packing import split_rows, token_rows
from mlx_lm_turboquant.kernels import launch


def _kv(L, seed, D=128, H=2):
    k = mx.random.normal((1, H, L, D), key=mx.random.key(seed)).astype(mx.bfloat16)
    v = mx.random.normal((1, H, L, D), key=mx.random.key(seed + 1)).astype(mx.bfloat16)
    return k * 3.0, v


def _pair(scheme, chunks=(200, 1, 1, 60), D=128):
    """The same tokens in a cache keeping rows and in one keeping four arrays."""
    rows, apart = TurboQuantKVCache(scheme, layer_index=3), TurboQuantKVCache(scheme, 3)
    apart.packs_rows = False
    for i, L in enumerate(chunks):
        for c in (rows, apart):
            c.update_and_fetch(*_kv(L, 7 * i, D))
    return rows, apart


def _same(a, b):
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == mx.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            a, b = a.astype(mx.float32), b.astype(mx.float32)
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_token_rows_round_trip_and_byte_count():
    k = mx.random.randint(0, 2**31, (2, 3, 5, 12)).astype(mx.uint32)
    v = mx.random.randint(0, 2**31, (2, 3, 5, 8)).astype(mx.uint32)
    kn = mx.random.uniform(0, 300, (2, 3, 5)).astype(mx.float16)
    vn = -mx.random.uniform(0, 300, (2, 3, 5)).astype(mx.float16)  # sign bit in the high half
    rows = token_rows(k, kn, v, vn)
    assert rows.shape == (2, 3, 5, 21) and rows.dtype == mx.uint32
    assert rows.nbytes == k.nbytes + kn.nbytes + v.nbytes + vn.nbytes
    for got, want in zip(split_rows(rows, 12), (k, kn, v, vn)):
        _same(got, want)


@pytest.mark.parametrize("scheme", ["turbo4", "turbo3", "turbo2v4", "turbo8v2"])
def test_rows_hold_what_four_arrays_hold(scheme):
    rows, apart = _pair(scheme)
    assert rows.packed is not None and apart.packed is None
    assert rows.packed.shape[-1] == apart.keys.shape[-1] + apart.values.shape[-1] + 1
    for name in ("keys", "key_norms", "values", "value_norms"):
        _same(getattr(rows, name), getattr(apart, name))
    assert rows.nbytes == apart.nbytes and rows.offset == apart.offset == 262
    for x, y in zip(rows.dequantize(), apart.dequantize()):
        _same(x, y)
    q = mx.random.normal((1, 8, 1, 128)).astype(mx.bfloat16)
    _same(turboquant_sdpa(q, rows, 128**-0.5), turboquant_sdpa(q, apart, 128**-0.5))


def test_trim_and_overwrite_in_rows():
    rows, apart = _pair("turbo4", chunks=(40,))
    for c in (rows, apart):
        c.update_and_fetch(*_kv(5, 99))
        assert c.trim(5) == 5
        c.update_and_fetch(*_kv(2, 11))
    for x, y in zip(rows.fetch(), apart.fetch()):
        _same(x, y)


def test_assigning_an_array_keeps_the_others():
    rows, _ = _pair("turbo4", chunks=(30,))
    keys, key_norms, values, value_norms = rows.keys, rows.key_norms, rows.values, rows.value_norms
    rows.value_norms = value_norms * 2  # a writer that knows nothing of rows
    assert rows.packed is None
    _same(rows.keys, keys), _same(rows.key_norms, key_norms), _same(rows.values, values)
    _same(rows.value_norms, value_norms * 2)
    rows.update_and_fetch(*_kv(1, 5))  # and it keeps working, as four arrays
    assert rows.offset == 31 and rows.packed is None


def test_loaded_state_keeps_rows_again():
    rows, apart = _pair("turbo3", chunks=(33,))
    for c in (rows, apart):
        loaded = TurboQuantKVCache.from_state(c.state, getattr(c, "meta_state", None))
        assert loaded.packed is not None
        for x, y in zip(loaded.fetch(), rows.fetch()):
            _same(x, y)
    d = copy.deepcopy(rows)
    d.update_and_fetch(*_kv(1, 3))
    assert rows.offset == 33 and d.offset == 34


@pytest.mark.parametrize("scheme", ["turbo0v4", "turbo4-prod", "turbo3.5", "turbo4w16"])
def test_other_formats_keep_four_arrays(scheme):
    c = TurboQuantKVCache(scheme)
    c.update_and_fetch(*_kv(3, 1))
    assert c.packed is None and c.values is not None


def test_sliding_window_cache_keeps_four_arrays():
    c = RotatingTurboQuantKVCache("turbo4", max_size=8)
    for i in range(10):
        c.update_and_fetch(*_kv(1, i))
    assert c.packed is None and c.values.shape[2] == 8


def test_device_token_count_is_shared_and_follows_trims():
    a, b = _pair("turbo4", chunks=(17,))
    assert launch.device_tokens(a) is launch.device_tokens(b)
    for step in (1, 1, -3, 1):
        for c in (a, b):
            c.update_and_fetch(*_kv(1, step)) if step > 0 else c.trim(-step)
        count = launch.device_tokens(a)
        assert count.dtype == mx.int32 and count.tolist() == [a.attended_tokens]
        assert launch.device_tokens(b) is count


@pytest.mark.parametrize("n", [0, 7, (1 << 16) - 1, 1 << 16, 200_003])
def test_device_token_count_is_a_view_of_one_device_arange(n):
    # Counts past the arange's length grow it; every count reads back as itself.
    count = launch.device_tokens(SimpleNamespace(attended_tokens=n))
    assert count.dtype == mx.int32 and count.shape == (1,) and count.tolist() == [n]
    assert launch._COUNTS.size > n
    other = launch.device_tokens(SimpleNamespace(attended_tokens=n + 1))
    assert other.tolist() == [n + 1] and launch._COUNTS.size > n + 1
