"""BatchRotatingTurboQuantKVCache against mlx-lm's BatchRotatingKVCache, operation by operation.

Every operation BatchGenerator uses (merge of single caches, right-padded prefill with
prepare / finalize, decode past the window, filter, extend, extract, trim) runs on three
caches: BatchRotatingKVCache on the float tokens, BatchRotatingKVCache on token ids, and
the compressed cache. After each step the compressed cache must hold, slot for slot, the
codes of the tokens the id cache names (zeros where it holds padding zeros), keep the
same bookkeeping and masks, and attend like mlx's SDPA on those tokens' round trip.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import BatchRotatingKVCache, RotatingKVCache

from mlx_lm_turboquant.attention import turboquant_sdpa
from mlx_lm_turboquant.batch_cache import BatchTurboQuantKVCache
from mlx_lm_turboquant.cache import TurboQuantKVCache
from mlx_lm_turboquant.rotating_batch_cache import BatchRotatingTurboQuantKVCache
from mlx_lm_turboquant.rotating_cache import RotatingTurboQuantKVCache

H, HQ, D = 2, 4, 32
SCALE = D**-0.5


class Triple:
    """(float cache, id cache, compressed cache) moved together."""

    codes = {}  # token id -> its encoded arrays (shared by every Triple of a test)
    next_id = [1]  # 0 marks a padding zero
    rng = np.random.default_rng(0)

    def __init__(self, ref, ids, tq):
        self.ref, self.ids, self.tq = ref, ids, tq

    @classmethod
    def single(cls, max_size, steps):
        t = cls(RotatingKVCache(max_size), RotatingKVCache(max_size),
                RotatingTurboQuantKVCache("turbo4", 3, max_size=max_size))  # fmt: skip
        for L in steps:
            t.add(L)
        return t

    @classmethod
    def merge(cls, triples):
        return cls(*(type(getattr(triples[0], n)).merge([getattr(t, n) for t in triples])
                     for n in ("ref", "ids", "tq")))  # fmt: skip

    def batched(self):
        return isinstance(self.ref, BatchRotatingKVCache)

    def add(self, L, window_size=None):
        B = self.ref.offset.shape[0] if self.batched() else 1
        k, v = (mx.array(self.rng.standard_normal((B, H, L, D)).astype(np.float32)) for _ in "kv")
        first = self.next_id[0]
        self.next_id[0] += B * L
        ids = mx.arange(first, first + B * L, dtype=mx.float32).reshape(B, 1, L, 1)
        masks = [c.make_mask(L, window_size=window_size) for c in (self.ref, self.tq)]
        if self.batched() or not isinstance(masks[0], (str, type(None))):
            assert mx.array_equal(masks[0], masks[1]).item()
        else:
            assert masks[0] == masks[1]
        ref_k, _ = self.ref.update_and_fetch(k, v)
        self.ids.update_and_fetch(ids, ids)
        self.tq.update_and_fetch(k, v)
        new = TurboQuantKVCache.encode_tokens(self.tq, k, v)
        for b in range(B):
            for i in range(L):
                self.codes[first + b * L + i] = [
                    None if a is None else a[b : b + 1, :, i : i + 1] for a in new
                ]
        assert self.tq.attended_tokens == ref_k.shape[2]
        self.check()
        self.check_attention(masks[0], L)

    def bookkeeping(self, c):
        if isinstance(c, (BatchRotatingKVCache, BatchRotatingTurboQuantKVCache)):
            return (c.offset.tolist(), c.left_padding.tolist(), c._idx, c._offset, c.rotated,
                    c.max_size, c.size(), c.is_trimmable())  # fmt: skip
        return c.offset, c._idx, c.keep, c.max_size, c.size(), c.is_trimmable()

    def check(self):
        assert self.bookkeeping(self.tq) == self.bookkeeping(self.ref)
        if self.ref.keys is None:
            assert self.tq.empty()
            return
        ids = self.ids.keys_and_values()[0][:, 0, :, 0].astype(mx.int32).tolist()
        got = self.tq.fetch() if not self.batched() else self.tq.attention_cache().fetch()
        like = next(iter(self.codes.values()))
        for j, g in enumerate(got):
            if g is None:
                continue
            zero = mx.zeros((1, *like[j].shape[1:]), like[j].dtype)
            want = mx.concatenate([mx.concatenate(
                [self.codes[i][j] if i else zero for i in row], axis=2) for row in ids])  # fmt: skip
            assert mx.array_equal(g, want).item()

    def check_attention(self, mask, L):
        view = self.tq.attention_cache() if self.batched() else self.tq
        B = view.values.shape[0]
        k, v = view.dequantize()
        q = mx.array(self.rng.standard_normal((B, HQ, L, D)).astype(np.float32))
        out = turboquant_sdpa(q, view, scale=SCALE, mask=mask)
        rep = lambda x: mx.repeat(x, HQ // H, axis=1)  # noqa: E731
        want = mx.fast.scaled_dot_product_attention(q, rep(k), rep(v), scale=SCALE, mask=mask)
        assert mx.allclose(out, want, atol=2e-5).item()

    def do(self, name, *args):
        results = [getattr(c, name)(*args) for c in (self.ref, self.ids, self.tq)]
        self.check()
        return results


def test_generator_flow_matches_batch_rotating_kv_cache():
    W = 8
    a = Triple.single(W, [5, 1, 1, 1, 1, 1, 1])  # wrapped around
    b = Triple.single(W, [3])
    c = Triple.single(W, [])  # empty
    batch = Triple.merge([a, b, c])
    batch.check()
    # A right-padded prompt segment (BatchGenerator.prompt), then decoding past the window.
    for cache in (batch.ref, batch.ids, batch.tq):
        cache.prepare(lengths=[2, 4, 6], right_padding=[4, 2, 0])
    batch.add(4)  # in two chunks (prefill_step_size): the second rolls padding left first
    batch.add(2)
    batch.do("finalize")
    for _ in range(11):
        batch.add(1)
    batch.add(1, window_size=4)
    # Filter, extend with a fresh batch, and keep decoding.
    batch.do("filter", [2, 0])
    other = Triple.merge([Triple.single(W, [4]), Triple.single(W, [2, 1])])
    for cache in (other.ref, other.ids, other.tq):
        cache.prepare(lengths=[3, 1], right_padding=[0, 2])
    other.add(3)
    other.do("finalize")
    for x, y in zip((batch.ref, batch.ids, batch.tq), (other.ref, other.ids, other.tq)):
        x.extend(y)
    batch.check()
    for _ in range(3):
        batch.add(1)
    # Extract each row: a single compressed cache holding the same tokens in order.
    for i in range(4):
        single = Triple(*(cache.extract(i) for cache in (batch.ref, batch.ids, batch.tq)))
        assert type(single.tq) is RotatingTurboQuantKVCache
        single.check()
        single.add(1)
        single.add(2)


def test_short_prompts_trim_and_speculative_steps():
    batch = Triple.merge([Triple.single(16, [3]), Triple.single(16, [5])])
    batch.add(1)
    assert batch.tq.is_trimmable()
    batch.do("trim", 2)
    batch.add(3)  # a multi-token step on a batch (speculative verification)
    for _ in range(12):
        batch.add(1)
    batch.add(2)


def test_merge_and_extend_reject_what_they_cannot_hold():
    a = RotatingTurboQuantKVCache("turbo4", 1, max_size=8)
    with pytest.raises(ValueError, match="sizes"):
        RotatingTurboQuantKVCache.merge([a, RotatingTurboQuantKVCache("turbo4", 1, max_size=4)])
    with pytest.raises(ValueError, match="cannot merge a KVCache"):
        from mlx_lm.models.cache import KVCache

        RotatingTurboQuantKVCache.merge([a, KVCache()])
    with pytest.raises(ValueError, match="cannot merge a RotatingTurboQuantKVCache"):
        TurboQuantKVCache.merge([TurboQuantKVCache("turbo4", 1), a])
    with pytest.raises(ValueError, match="cannot combine"):
        RotatingTurboQuantKVCache.merge([a, RotatingTurboQuantKVCache("turbo3", 1, max_size=8)])
    full = BatchTurboQuantKVCache("turbo4", [0], 1)
    rot = BatchRotatingTurboQuantKVCache("turbo4", [0], 1, max_size=8)
    with pytest.raises(ValueError, match="cannot extend"):
        rot.extend(full)
    with pytest.raises(ValueError, match="cannot extend"):
        full.extend(rot)
    with pytest.raises(ValueError, match="windows of 8 and 4"):
        rot.extend(BatchRotatingTurboQuantKVCache("turbo4", [0], 1, max_size=4))


def test_plain_rotating_caches_merge_compressed():
    t = Triple.single(8, [4, 1])
    raw = RotatingKVCache(8)
    rng = np.random.default_rng(5)
    raw.update_and_fetch(*(mx.array(rng.standard_normal((1, H, 3, D)), mx.float32) for _ in "kv"))
    batch = RotatingTurboQuantKVCache.merge([t.tq, raw])
    assert isinstance(batch, BatchRotatingTurboQuantKVCache)
    assert batch.offset.tolist() == [5, 3] and batch.left_padding.tolist() == [0, 2]
    row = batch.extract(1)
    want = row.encode_tokens(raw.keys, raw.values)
    for x, y in zip(row.fetch(), want):
        assert mx.array_equal(x, y).item()


def test_state_round_trip_and_validation():
    batch = Triple.merge([Triple.single(8, [5, 1, 1, 1]), Triple.single(8, [2])])
    for _ in range(4):
        batch.add(1)
    back = BatchRotatingTurboQuantKVCache.from_state(batch.tq.state)
    assert batch.bookkeeping(back) == batch.bookkeeping(batch.tq)
    for x, y in zip(back._arrays(), batch.tq._arrays()):
        assert mx.array_equal(x, y).item()
    state = list(batch.tq.state)
    with pytest.raises(ValueError, match="holds 22 items"):
        BatchRotatingTurboQuantKVCache.from_state(state[:19])
    bad = list(state)
    bad[-1] = 2
    with pytest.raises(ValueError, match="rotated must be a bool"):
        BatchRotatingTurboQuantKVCache.from_state(bad)
    bad = list(state)
    bad[-3] = 0
    with pytest.raises(ValueError, match="max_size must be at least 1"):
        BatchRotatingTurboQuantKVCache.from_state(bad)
