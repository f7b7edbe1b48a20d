import copy
import types

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import cache as mlx_cache

from mlx_lm_turboquant import TurboQuantKVCache, schemes
from mlx_lm_turboquant.cache import layer_seed
from mlx_lm_turboquant.codec import packed_words

ALL_SCHEMES = schemes()


def _kv(B=1, H=2, L=10, D=128, seed=0, dtype=mx.float16):
    k = mx.random.normal((B, H, L, D), key=mx.random.key(seed)).astype(dtype)
    v = mx.random.normal((B, H, L, D), key=mx.random.key(seed + 1)).astype(dtype)
    return k, v


def _filled(scheme="turbo4", chunks=(100, 1, 1, 60), D=128, layer=0):
    c = TurboQuantKVCache(scheme, layer_index=layer)
    for i, L in enumerate(chunks):
        c.update_and_fetch(*_kv(L=L, D=D, seed=10 * i))
    return c


def _arrays(c):
    return [np.array(a) for a in c.fetch() if a is not None]


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_offsets_handles_and_growth(scheme):
    c = TurboQuantKVCache(scheme)
    assert c.empty() and c.offset == 0 and c.nbytes == 0
    k, v = c.update_and_fetch(*_kv(L=300))
    assert c.offset == c.size() == 300 and k.shape == (1, 2, 300, 128)
    capacity = c.values.shape[2]
    assert capacity >= 300 and capacity % 256 == 0
    for _ in range(capacity - 300):  # filling the slack must not reallocate
        c.update_and_fetch(*_kv(L=1))
    assert c.values.shape[2] == capacity
    c.update_and_fetch(*_kv(L=1))
    assert c.values.shape[2] == capacity + 256 and c.offset == capacity + 1


def test_no_bits_attribute_and_no_to_quantized():
    # mlx-lm routes caches with `bits` to its own quantized path, and `--kv-bits`
    # converts caches with `to_quantized`.
    c = _filled()
    assert not hasattr(c, "bits") and not hasattr(c, "to_quantized")


def test_compresses_as_tokens_arrive():
    c = _filled("turbo3")
    assert c.keys.dtype == mx.uint32 and c.values.dtype == mx.uint32
    assert c.keys.shape[-1] == packed_words(128, 3) == 12


def test_chunking_does_not_change_the_data():
    k, v = _kv(L=37)
    a, b = TurboQuantKVCache("turbo4"), TurboQuantKVCache("turbo4")
    a.update_and_fetch(k, v)
    for i in range(37):
        b.update_and_fetch(k[:, :, i : i + 1], v[:, :, i : i + 1])
    for x, y in zip(_arrays(a), _arrays(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("scheme", ["turbo4", "turbo0v4", "turbo3", "turbo8v2"])
def test_nbytes_against_theory(scheme):
    c = TurboQuantKVCache(scheme)
    c.update_and_fetch(*_kv(L=512))  # a whole number of steps: no slack
    assert c.nbytes == 512 * c.bytes_per_token()
    kb, vb = c.scheme.key_bits, c.scheme.value_bits
    key_bytes = 2 * 128 if kb == 0 else 128 * kb // 8 + 2
    assert c.bytes_per_token() == 2 * (key_bytes + 128 * vb // 8 + 2)


def test_trim_is_exact_and_appends_overwrite():
    c = _filled(chunks=(50,))
    before = _arrays(c)
    c.update_and_fetch(*_kv(L=5, seed=99))
    assert c.trim(5) == 5 and c.offset == 50
    for x, y in zip(before, _arrays(c)):
        np.testing.assert_array_equal(x, y)
    assert c.trim(1000) == 50 and c.offset == 0
    c.update_and_fetch(*_kv(L=3))
    assert c.offset == 3 and c.is_trimmable()


def test_deepcopy_is_independent():
    c = _filled(chunks=(20,))
    d = copy.deepcopy(c)
    d.update_and_fetch(*_kv(L=4, seed=5))
    d.trim(10)
    assert c.offset == 20 and d.offset == 14
    c.update_and_fetch(*_kv(L=1, seed=6))
    np.testing.assert_array_equal(_arrays(c)[0][:, :, :14], _arrays(d)[0])


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_save_load_round_trip_is_bit_exact(tmp_path, scheme):
    mlx_cache.TurboQuantKVCache = TurboQuantKVCache  # what the integration registers
    caches = [_filled(scheme, chunks=(40, 1), layer=i) for i in range(2)] + [mlx_cache.KVCache()]
    caches[2].update_and_fetch(*_kv(L=41))
    path = str(tmp_path / "cache.safetensors")
    mlx_cache.save_prompt_cache(path, caches, {"kv_scheme": scheme})
    loaded, meta = mlx_cache.load_prompt_cache(path, return_metadata=True)
    assert meta["kv_scheme"] == scheme
    for a, b in zip(caches[:2], loaded[:2]):
        assert type(b) is TurboQuantKVCache
        assert (b.scheme, b.layer_index, b.offset, b.dtype) == (a.scheme, a.layer_index, a.offset, a.dtype)
        for x, y in zip(_arrays(a), _arrays(b)):
            np.testing.assert_array_equal(x, y)
        for x, y in zip(a.dequantize(), b.dequantize()):
            np.testing.assert_array_equal(np.array(x), np.array(y))
    # The loaded cache keeps working.
    loaded[0].update_and_fetch(*_kv(L=2))
    assert loaded[0].offset == 43


def test_meta_state_round_trip():
    c = _filled("turbo8v2", chunks=(9,), layer=4)
    # Older mlx-lm versions pass strings in meta_state and arrays in state.
    e = TurboQuantKVCache.__new__(TurboQuantKVCache)
    e.keys = e.key_norms = e.values = e.value_norms = e._dtype = None
    e.meta_state = c.meta_state
    e._set_arrays(list(c.fetch()))
    assert e.scheme == c.scheme and e.offset == 9 and e.layer_index == 4
    for x, y in zip(_arrays(c), _arrays(e)):
        np.testing.assert_array_equal(x, y)


def test_state_validation_rejects_inconsistent_arrays():
    c = _filled(chunks=(8,))
    state = list(c.state)
    bad = list(state)
    bad[2] = bad[2][..., :-1]  # values lose a word
    with pytest.raises(ValueError, match="values has shape"):
        TurboQuantKVCache.from_state(bad)
    bad = list(state)
    bad[10] = 500  # offset beyond the stored tokens
    with pytest.raises(ValueError, match="offset 500"):
        TurboQuantKVCache.from_state(bad)
    bad = list(state)
    bad[5] = 7  # key bits that do not match the scheme name
    with pytest.raises(ValueError, match="does not match"):
        TurboQuantKVCache.from_state(bad)


def test_seeds_differ_per_layer_and_between_keys_and_values():
    seeds = {layer_seed(0, layer, kind) for layer in range(32) for kind in (0, 1)}
    assert len(seeds) == 64
    a, b = _filled(layer=0), _filled(layer=1)
    assert not np.array_equal(np.array(a.key_codec.rotation.matrix), np.array(b.key_codec.rotation.matrix))
    assert not np.array_equal(np.array(a.key_codec.rotation.matrix), np.array(a.value_codec.rotation.matrix))


def test_mask_matches_kvcache():
    c, ref = _filled(chunks=(7,)), mlx_cache.KVCache()
    ref.update_and_fetch(*_kv(L=7))
    for n in (1, 5):
        for return_array in (False, True):
            kw = dict(return_array=return_array, window_size=None)  # as models call it
            a, b = c.make_mask(n, **kw), ref.make_mask(n, **kw)
            assert type(a) is type(b)
            if isinstance(a, mx.array):
                np.testing.assert_array_equal(np.array(a), np.array(b))


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown KV scheme"):
        TurboQuantKVCache("turbo5")
    with pytest.raises(ValueError, match="layer_index"):
        TurboQuantKVCache("turbo4", layer_index=-1)
    c = _filled(chunks=(3,))
    with pytest.raises(ValueError, match="head dims changed"):
        c.update_and_fetch(*_kv(L=1, D=64))


@pytest.mark.parametrize("scheme", ["turbo3.5w16", "turbo4w16-prod", "turbo0v3w8"])
def test_recent_window_with_every_format(scheme):
    from mlx_lm_turboquant.kernels.reference import reference_sdpa

    c = _filled(scheme, chunks=(40, 3), layer=2)
    w = c.scheme.window
    q = mx.random.normal((1, 4, 1, c.k_dim))
    # Attending only to the window gives exact attention on the kept tokens, whatever
    # the format of the older ones (prod keys add a QJL term there, split permutes).
    recent_only = mx.arange(c.offset)[None, None, None, :] >= c.offset - w
    got = reference_sdpa(q, c, 0.1, mask=recent_only)
    want = mx.fast.scaled_dot_product_attention(q, c.recent_keys, c.recent_values, scale=0.1)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6)
    # Round trip through the state, window and (split) channel orders included.
    b = TurboQuantKVCache.from_state(c.state)
    assert b.scheme == c.scheme and b.recent_keys.shape[2] == w
    np.testing.assert_allclose(np.array(reference_sdpa(q, b, 0.1)),
                               np.array(reference_sdpa(q, c, 0.1)), atol=1e-6)  # fmt: skip
    if c.scheme.variant != "prod":  # there attention is not a function of dequantize()
        k, v = c.dequantize()
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.1)
        np.testing.assert_allclose(np.array(reference_sdpa(q, c, 0.1)), np.array(want),
                                   atol=2e-6)  # fmt: skip


def test_recent_window_is_read_uncompressed_and_survives_trim_and_files(tmp_path, monkeypatch):
    from mlx_lm_turboquant import kernels
    from mlx_lm_turboquant.kernels.reference import reference_sdpa

    c = _filled("turbo3w16", chunks=(40, 1, 1), layer=1)
    assert c.recent_keys.shape[2] == 16 and c.scheme.window == 16
    # The last 16 tokens are exact, the older ones decoded, in what attention reads.
    k, v = c.dequantize()
    np.testing.assert_array_equal(np.array(k[:, :, -16:]), np.array(c.recent_keys))
    q = mx.random.normal((1, 4, 2, k.shape[-1]))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.1, mask="causal")
    got = reference_sdpa(q, c, 0.1, mask="causal", block_tokens=16)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6)
    # No fused kernel reads a window: dispatch declines before looking for one.
    with monkeypatch.context() as m:
        boom = types.SimpleNamespace(NAME="fake", decode_attention=lambda *a, **k: 1 / 0)
        m.setattr(kernels, "active_backend", lambda: boom)
        assert kernels.run("decode_attention", q, c, 0.1) is None
    c.trim(5)
    assert c.recent_keys.shape[2] == 11 and c.offset == 37
    c.update_and_fetch(*_kv(L=9))
    assert c.recent_keys.shape[2] == 16
    # Prompt-cache files carry the window (two more arrays).
    mlx_cache.TurboQuantKVCache = TurboQuantKVCache
    path = str(tmp_path / "cache.safetensors")
    mlx_cache.save_prompt_cache(path, [c])
    (b,) = mlx_cache.load_prompt_cache(path)
    assert b.scheme == c.scheme and b.offset == c.offset
    np.testing.assert_array_equal(np.array(b.recent_values), np.array(c.recent_values))
    bad = list(c.state)
    bad[-2] = bad[-2][:, :, :, :3]
    with pytest.raises(ValueError, match="window of 16"):
        TurboQuantKVCache.from_state(bad)
    with pytest.raises(ValueError, match="does not match a state of"):
        TurboQuantKVCache.from_state(bad[:-2])
    from mlx_lm_turboquant.batch_cache import BatchTurboQuantKVCache

    with pytest.raises(ValueError, match="batched caches do not support"):
        BatchTurboQuantKVCache("turbo4w16", left_padding=[0, 1])
