"""RotatingTurboQuantKVCache against mlx-lm's RotatingKVCache driven with the same tokens.

A second RotatingKVCache fed each token's position tells which tokens RotatingKVCache
returns, in which order. The compressed cache must then hold exactly the codes those
tokens got when they arrived (so its dequantized tokens are their codec round trip, same
set, same order), give the same masks, and attention through ``turboquant_sdpa`` with its
mask must match ``mx.fast.scaled_dot_product_attention`` on RotatingKVCache's tokens
(codec round trip) with RotatingKVCache's mask.
"""

import copy

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import RotatingKVCache, load_prompt_cache, save_prompt_cache

from mlx_lm_turboquant.attention import turboquant_sdpa
from mlx_lm_turboquant.cache import TurboQuantKVCache
from mlx_lm_turboquant.rotating_cache import RotatingTurboQuantKVCache, compress_rotating_cache

H, HQ, D = 2, 4, 32


def _same_mask(a, b):
    if a is None or isinstance(a, str):
        return a == b
    return not isinstance(b, (str, type(None))) and a.shape == b.shape and mx.array_equal(a, b).item()


class Driver:
    """The same operations on a RotatingKVCache, a position-tag RotatingKVCache and a
    RotatingTurboQuantKVCache, checked after every step."""

    def __init__(self, max_size, keep, scheme="turbo4", window_size=None, seed=0):
        self.ref = RotatingKVCache(max_size, keep)
        self.tags = RotatingKVCache(max_size, keep)
        self.tq = RotatingTurboQuantKVCache(scheme, 5, max_size=max_size, keep=keep)
        self.window_size = window_size
        self.codes = {}  # position -> its stored arrays, encoded when it arrived
        self.rng = np.random.default_rng(seed)

    def add(self, L):
        k, v = (mx.array(self.rng.standard_normal((1, H, L, D)).astype(np.float32)) for _ in "kv")
        pos = mx.arange(self.ref.offset, self.ref.offset + L, dtype=mx.float32)
        pos = mx.broadcast_to(pos[None, None, :, None], (1, 1, L, 1))
        masks = [c.make_mask(L, window_size=self.window_size) for c in (self.ref, self.tq)]
        assert _same_mask(*masks), f"masks differ: {masks}"
        start = self.ref.offset
        ref_k, ref_v = self.ref.update_and_fetch(k, v)
        order, _ = self.tags.update_and_fetch(pos, pos)
        self.tq.update_and_fetch(k, v)
        new = self.tq.encode_tokens(k, v)  # what the cache encoded: same function, same shape
        for i in range(L):
            self.codes[start + i] = tuple(None if a is None else a[:, :, i : i + 1] for a in new)
        self.check(order[0, 0, :, 0].astype(mx.int32).tolist(), masks[0], L, ref_k.shape[2])

    def check(self, order, mask, L, n_ref):
        tq = self.tq
        assert (tq.offset, tq.size(), tq.is_trimmable()) == (
            self.ref.offset, self.ref.size(), self.ref.is_trimmable())
        assert tq.attended_tokens == n_ref == len(order)
        expected = [mx.concatenate([self.codes[p][j] for p in order], axis=2)
                    if self.codes[order[0]][j] is not None else None for j in range(4)]  # fmt: skip
        for got, want in zip(tq.fetch(), expected):
            assert (got is None) == (want is None)
            if got is not None:
                assert mx.array_equal(got, want).item()
        # Attention over the cache vs mlx's SDPA over RotatingKVCache's tokens, round-tripped.
        k, v = tq.dequantize()
        q = mx.array(self.rng.standard_normal((1, HQ, L, D)).astype(np.float32))
        out = turboquant_sdpa(q, tq, scale=D**-0.5, mask=mask)
        rep = lambda x: mx.repeat(x, HQ // H, axis=1)  # noqa: E731
        want = mx.fast.scaled_dot_product_attention(q, rep(k), rep(v), scale=D**-0.5, mask=mask)
        assert mx.allclose(out, want, atol=2e-5).item()

    def trim(self, n):
        if not self.ref.is_trimmable():
            return
        assert self.tq.trim(n) == self.ref.trim(n) == self.tags.trim(n)


@pytest.mark.parametrize(
    "max_size, keep, steps",
    [
        (8, 0, [1] * 20),  # decode only: grow, wrap around, keep wrapping
        (8, 2, [1] * 20),
        (8, 0, [5, 1, 1, 1, 1, 1, 4, 1, 1]),  # prefill, wrap, prefill again after wrapping
        (8, 3, [5, 1, 1, 1, 1, 1, 4, 1, 1, 9, 1]),
        (6, 2, [13, 1, 2, 1, 1, 3]),  # first chunk longer than the window
        (16, 0, [3, 3, 3, 3, 3, 1, 1, 2]),
        (300, 4, [1] * 260 + [2, 1]),  # growth in steps of 256 up to max_size
        (1, 0, [1, 1, 3, 1]),
    ],
)
@pytest.mark.parametrize("scheme", ["turbo4", "turbo0v4"])
def test_matches_rotating_kv_cache(max_size, keep, steps, scheme):
    d = Driver(max_size, keep, scheme)
    for L in steps:
        d.add(L)


def test_trims_and_window_masks():
    d = Driver(8, 1, window_size=5)
    for op in [3, ("trim", 2), 1, 1, ("trim", 1), 4, 1, 1, 1, 1, 1, 1, 1, 2, 1]:
        d.trim(op[1]) if isinstance(op, tuple) else d.add(op)


OPS = st.lists(
    st.one_of(st.sampled_from([1, 1, 1, 2, 3, 7]), st.tuples(st.just("trim"), st.integers(1, 4))),
    min_size=1,
    max_size=24,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_size=st.integers(1, 10), keep=st.integers(0, 3), ops=OPS,
       window=st.sampled_from([None, 2, 4]))  # fmt: skip
def test_any_sequence_matches_rotating_kv_cache(max_size, keep, ops, window):
    keep = min(keep, max_size - 1)
    d = Driver(max_size, keep, window_size=window)
    for op in ops:
        d.trim(op[1]) if isinstance(op, tuple) else d.add(op)


def filled(max_size=8, keep=2, steps=(5, 1, 1, 1, 1, 1), scheme="turbo4"):
    d = Driver(max_size, keep, scheme)
    for L in steps:
        d.add(L)
    return d


def test_state_round_trip_then_same_continuation(tmp_path, patched):
    d = filled()
    back = RotatingTurboQuantKVCache.from_state(d.tq.state)
    assert (back.offset, back._idx, back.keep, back.max_size) == (
        d.tq.offset, d.tq._idx, d.tq.keep, d.tq.max_size)
    copied = copy.deepcopy(d.tq)  # the server's LRU prompt cache deep-copies caches
    path = str(tmp_path / "rot.safetensors")
    save_prompt_cache(path, [d.tq])
    (loaded,) = load_prompt_cache(path)
    assert type(loaded) is RotatingTurboQuantKVCache
    k, v = (mx.array(np.random.default_rng(9).standard_normal((1, H, 1, D)), mx.float32)
            for _ in "kv")  # fmt: skip
    outs = []
    for c in (d.tq, back, copied, loaded):
        c.update_and_fetch(k, v)
        outs.append(c.fetch())
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert mx.array_equal(a, b).item()


def test_bad_state_and_arguments_raise_value_error():
    with pytest.raises(ValueError, match="keep must be in"):
        RotatingTurboQuantKVCache("turbo4", max_size=4, keep=4)
    with pytest.raises(ValueError, match="max_size must be at least 1"):
        RotatingTurboQuantKVCache("turbo4", max_size=0)
    with pytest.raises(ValueError, match="max_size must be an int"):
        RotatingTurboQuantKVCache("turbo4", max_size=4.0)
    state = list(filled().tq.state)
    with pytest.raises(ValueError, match="state holds 20 items"):
        RotatingTurboQuantKVCache.from_state(state[:-1])
    bad = list(state)
    bad[-3] = 99  # _idx beyond the buffer (the two channel orders come last)
    with pytest.raises(ValueError, match="_idx 99 is beyond"):
        RotatingTurboQuantKVCache.from_state(bad)
    bad = list(state)
    bad[-5] = 8  # keep == max_size
    with pytest.raises(ValueError, match="keep must be in"):
        RotatingTurboQuantKVCache.from_state(bad)
    bad = list(state)
    bad[2] = bad[2][:, :, :3]  # fewer value slots than the window holds
    with pytest.raises(ValueError):
        RotatingTurboQuantKVCache.from_state(bad)
    with pytest.raises(ValueError, match="TurboQuantKVCache state holds 17 items"):
        TurboQuantKVCache.from_state(state)


def test_compress_rotating_cache_holds_the_window_in_order():
    ref = RotatingKVCache(6, 1)
    rng = np.random.default_rng(3)
    for L in (4, 1, 1, 1, 1, 1):
        ref.update_and_fetch(*(mx.array(rng.standard_normal((1, H, L, D)), mx.float32) for _ in "kv"))
    c = compress_rotating_cache(ref, "turbo4", 2)
    assert (c.offset, c.size(), c.keep, c.max_size) == (ref.offset, ref.size(), 1, 6)
    want = c.encode_tokens(ref._temporal_order(ref.keys), ref._temporal_order(ref.values))
    for a, b in zip(c.fetch(), want):
        assert mx.array_equal(a, b).item()
    # Decoding continues like RotatingKVCache from here on.
    k, v = (mx.array(rng.standard_normal((1, H, 1, D)), mx.float32) for _ in "kv")
    ref.update_and_fetch(k, v)
    c.update_and_fetch(k, v)
    assert c.size() == ref.size() and c.attended_tokens == ref.keys.shape[2]


def test_real_model_through_a_compressed_sliding_window(real_model, val_ids):
    """tq-llama-8k with every layer given a 64-token window, 128 teacher-forced steps past
    it: turbo4 against RotatingKVCache stays close (docs/models.md has 512 / 1024 tokens)."""
    from mlx_lm_turboquant.eval.kld import step_logprobs

    model, _ = real_model
    n = len(model.layers)
    ref = step_logprobs(model, val_ids, [RotatingKVCache(64) for _ in range(n)], 32, 128)
    cache = [RotatingTurboQuantKVCache("turbo4", i, max_size=64) for i in range(n)]
    tq = step_logprobs(model, val_ids, cache, 32, 128)
    kl = (mx.exp(ref) * (ref - tq)).sum(axis=-1).mean().item()
    agree = (ref.argmax(-1) == tq.argmax(-1)).mean().item()
    assert all(c.offset == 160 and c.attended_tokens == 64 for c in cache)
    assert kl < 0.05 and agree > 0.85, (kl, agree)
