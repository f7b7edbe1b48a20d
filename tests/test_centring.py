"""Keys centred in RoPE's frame (the ``c`` schemes): the probe that copies a model's RoPE,
the cache that stores keys less their turned mean, attention that adds the mean's scores
back, and everything around them (state files, batch and sliding caches, the plan)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models import rope_utils

from mlx_lm_turboquant import TurboQuantKVCache, api
from mlx_lm_turboquant.batch_cache import BatchTurboQuantKVCache
from mlx_lm_turboquant.codec.centring import (MIN_CENTRE_TOKENS, RopeFrame, key_mean,
                                              mean_keys, probe_rope)  # fmt: skip
from mlx_lm_turboquant.config import parse_layer_plan, parse_scheme, with_centring
from mlx_lm_turboquant.kernels.reference import reference_sdpa
from mlx_lm_turboquant.rotating_cache import RotatingTurboQuantKVCache

D = 128
ROPES = {
    "default": lambda: nn.RoPE(D, traditional=False, base=10000),
    "traditional": lambda: nn.RoPE(D, traditional=True, base=500000),
    "partial": lambda: nn.RoPE(64, traditional=False, base=10000),
    "linear scaled": lambda: nn.RoPE(D, base=10000, scale=0.25),
    "llama3": lambda: rope_utils.initialize_rope(D, 500000.0, False, {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, 131072),  # fmt: skip
    "yarn (scales its input)": lambda: rope_utils.initialize_rope(D, 10000.0, False, {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1, "mscale_all_dim": 0}, 16384),  # fmt: skip
    "su-scaled (scales its input)": lambda: rope_utils.SuScaledRoPE(
        D, 10000.0, 131072, 4096, long_factor=[1.5] * (D // 2)),
    "proportional (half rotated)": lambda: rope_utils.ProportionalRoPE(D, D // 2),
}


def _unit(x):
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("name", ROPES)
def test_probe_copies_the_modules_rotation(name):
    rope = ROPES[name]()
    frame = probe_rope(rope, D)
    x = mx.random.normal((1, 2, 5, D), key=mx.random.key(1))
    for offset in (0, 3, 1000, 30000):  # directions agree (YaRN also scales lengths)
        err = mx.abs(_unit(rope(x, offset=offset)) - _unit(frame.rotate(x, offset))).max()
        assert float(err) < 2e-3, (name, offset, float(err))
    back = frame.rotate(frame.rotate(x, 777), 777, inverse=True)
    assert float(mx.abs(back - x).max()) < 1e-4


class _QuadraticRope(nn.Module):
    """Turns pairs by position squared: not a RoPE a frame can copy."""

    dims, traditional = D, False

    def __call__(self, x, offset=0):
        return mx.fast.rope(x, D, traditional=False, base=10000.0, scale=float(offset or 1),
                            offset=offset)  # fmt: skip


def test_probe_refuses_what_is_not_a_rope():
    with pytest.raises(ValueError, match="pairwise rotation linear in the position"):
        probe_rope(_QuadraticRope(), D)
    with pytest.raises(ValueError, match="cannot probe"):
        probe_rope(lambda x, offset: x[..., :3], D)


def test_frame_array_round_trip_and_checks():
    frame = probe_rope(ROPES["traditional"](), D)
    back = RopeFrame.from_array(frame.to_array(), D)
    assert (back.dims, back.traditional) == (D, True)
    assert mx.array_equal(back.freqs, frame.freqs)
    bad = [mx.zeros((65,), mx.float16), mx.ones((2, 65)), mx.array([0.5] + [1.0] * 64),
           mx.array([0.0] + [-1.0] * 64), mx.ones((66,)) * 2]  # fmt: skip
    for a in bad[:4]:
        with pytest.raises(ValueError, match="RoPE frame"):
            RopeFrame.from_array(a.astype(mx.float32) if a.dtype != mx.float16 else a, D)
    with pytest.raises(ValueError, match="RoPE frame for D=128"):
        RopeFrame.from_array(mx.ones((66,)), D)  # 130 channels


def test_scheme_names():
    s = parse_scheme("turbo3c")
    assert s.centre_keys and (s.key_bits, s.value_bits) == (3, 3) and s.name == "turbo3c"
    s = parse_scheme("TURBO4v3cw9")
    assert s.centre_keys and s.window == 9 and s.name == "turbo4v3cw9"
    assert parse_scheme("turbo3.5c").variant == "split" and parse_scheme("turbo3.5c").centre_keys
    assert parse_scheme("turbo4cw16-prod").variant == "prod"
    assert not parse_scheme("turbo3").centre_keys
    for bad in ("turbo0v4c", "turbo3cc", "turbo3w9c", "turbo3c-"):
        with pytest.raises(ValueError, match="unknown KV scheme"):
            parse_scheme(bad)
    assert with_centring(parse_scheme("turbo3w9"), True).name == "turbo3cw9"
    assert with_centring(parse_scheme("turbo3cw9"), False).name == "turbo3w9"
    assert with_centring(parse_scheme("turbo0v4"), True).name == "turbo0v4"
    # Per-layer schemes take the base's centring, as they take its window.
    plan = parse_layer_plan("-1=turbo4v3", 6, "turbo3cw9")
    assert [s.name for s in plan.values()] == ["turbo3cw9"] * 5 + ["turbo4v3cw9"]
    assert api.boundary_scheme(parse_scheme("turbo3cw9")).name == "turbo8v4cw9"


def _centred_keys(L, offset, frame, B=1, H=2, seed=0, mean_size=3.0):
    """Keys with a large shared mean before RoPE (as a real model's), turned to positions."""
    mu = mean_size * mx.random.normal((B, H, 1, D), key=mx.random.key(seed))
    pre = mu + mx.random.normal((B, H, L, D), key=mx.random.key(seed + 1))
    return frame.rotate(pre, offset).astype(mx.float16)


def _cache(scheme, frame=None):
    s = parse_scheme(scheme)
    return TurboQuantKVCache(s, 0, rope_frame=frame if s.centre_keys else None)


def test_centring_leaves_a_smaller_error_and_the_same_decoded_keys():
    frame = probe_rope(ROPES["default"](), D)
    k = _centred_keys(300, 0, frame)
    v = mx.random.normal(k.shape, key=mx.random.key(5)).astype(mx.float16)
    errors = {}
    for scheme in ("turbo3", "turbo3c"):
        c = _cache(scheme, frame)
        c.update_and_fetch(k[:, :, :200], v[:, :, :200])
        c.update_and_fetch(k[:, :, 200:], v[:, :, 200:])  # later tokens: the same mean
        kd, vd = c.dequantize()
        kf = k.astype(mx.float32)
        errors[scheme] = float(((kd - kf) ** 2).sum() / (kf**2).sum())
        assert mx.allclose(vd, c.dequantize()[1])
    # A mean of 3 per channel against unit noise: 10x the energy, removed before coding.
    assert errors["turbo3c"] < errors["turbo3"] / 5, errors
    assert errors["turbo3c"] < 0.05


def test_key_mean_is_taken_once_and_short_first_updates_centre_on_zero():
    frame = probe_rope(ROPES["default"](), D)
    k = _centred_keys(64, 0, frame)
    c = _cache("turbo4c", frame)
    c.update_and_fetch(k[:, :, : MIN_CENTRE_TOKENS - 1], k[:, :, : MIN_CENTRE_TOKENS - 1])
    assert float(mx.abs(c.key_mean).max()) == 0.0
    c.update_and_fetch(k[:, :, MIN_CENTRE_TOKENS - 1 :], k[:, :, MIN_CENTRE_TOKENS - 1 :])
    assert float(mx.abs(c.key_mean).max()) == 0.0  # fixed by the first update, for good
    c = _cache("turbo4c", frame)
    c.update_and_fetch(k[:, :, :32], k[:, :, :32])
    first = np.array(c.key_mean)
    expect = frame.rotate(k[:, :, :32].astype(mx.float32), 0, inverse=True).mean(2, keepdims=True)
    assert np.allclose(first, np.array(expect), atol=1e-5)
    c.update_and_fetch(k[:, :, 32:], k[:, :, 32:])
    assert np.array_equal(first, np.array(c.key_mean))


@pytest.mark.parametrize("scheme", ["turbo3c", "turbo4v3cw9", "turbo3.5c", "turbo4c-prod"])
def test_attention_matches_dense_attention_on_the_decoded_cache(scheme):
    frame = probe_rope(ROPES["default"](), D)
    k = _centred_keys(200, 0, frame, seed=3)
    v = mx.random.normal(k.shape, key=mx.random.key(9)).astype(mx.float16)
    c = _cache(scheme, frame)
    c.update_and_fetch(k[:, :, :150], v[:, :, :150])
    for t in range(150, 200, 10):
        c.update_and_fetch(k[:, :, t : t + 10], v[:, :, t : t + 10])
    kd, vd = c.dequantize()
    q = mx.random.normal((1, 4, 3, D), key=mx.random.key(11))  # GQA: 4 query heads on 2
    for mask, block in ((None, 64), ("causal", 37)):
        got = reference_sdpa(q, c, D**-0.5, mask=mask, block_tokens=block)
        want = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=D**-0.5, mask=mask)
        assert float(mx.abs(got - want).max()) < 2e-3, (scheme, mask)  # GPU matmuls: TF32


def test_fused_kernels_read_centred_caches_but_not_windows():
    frame = probe_rope(ROPES["default"](), D)
    assert _cache("turbo3", None).plain and _cache("turbo3c", frame).plain
    assert not _cache("turbo3cw9", frame).plain


@pytest.mark.parametrize("name", ["default", "traditional", "partial"])
def test_standard_frame_is_the_probed_one(name):
    rope = ROPES[name]()
    probed = probe_rope(rope, D)
    frame = RopeFrame.standard(rope.dims, rope.base, rope.traditional)
    assert (frame.dims, frame.traditional) == (probed.dims, probed.traditional)
    assert np.allclose(np.array(frame.freqs), np.array(probed.freqs), rtol=1e-3)
    assert np.allclose(np.array(frame.omega), 1.0 / np.array(frame.freqs), rtol=1e-6)
    for dims, base in ((127, 10000.0), (0, 10000.0), (128, 1.0), ("128", 10000.0)):
        with pytest.raises(ValueError, match="even dims >= 2 and a base > 1"):
            RopeFrame.standard(dims, base)


def test_the_cache_asks_for_a_frame_exactly_when_it_centres():
    frame = probe_rope(ROPES["default"](), D)
    with pytest.raises(ValueError, match="needs the layer's rope_frame"):
        TurboQuantKVCache("turbo3c")
    with pytest.raises(ValueError, match="does not centre keys"):
        TurboQuantKVCache("turbo3", rope_frame=frame)
    c = TurboQuantKVCache("turbo3c", rope_frame=probe_rope(nn.RoPE(256), 256))
    with pytest.raises(ValueError, match="turns 256 channels, keys have 128"):
        c.update_and_fetch(*(mx.zeros((1, 2, 20, D)),) * 2)


def test_state_round_trip_and_corrupt_states(tmp_path):
    frame = probe_rope(ROPES["traditional"](), D)
    k = _centred_keys(100, 0, frame)
    c = _cache("turbo3cw9", frame)
    c.update_and_fetch(k, k)
    mlx_cache.TurboQuantKVCache = TurboQuantKVCache  # what the integration registers
    path = str(tmp_path / "c.safetensors")
    mlx_cache.save_prompt_cache(path, [c])
    (back,) = mlx_cache.load_prompt_cache(path)
    assert back.scheme.name == "turbo3cw9" and back.rope_frame.traditional
    q = mx.random.normal((1, 2, 1, D), key=mx.random.key(2))
    assert mx.array_equal(reference_sdpa(q, c, 0.1), reference_sdpa(q, back, 0.1))
    back.update_and_fetch(k[:, :, :1], k[:, :, :1])  # goes on with the same mean
    assert mx.array_equal(back.key_mean, c.key_mean)
    state = list(c.state)
    for index, value, message in ((-2, mx.zeros((1, 2, D)), "key mean must be"),
                                  (-1, mx.array([0.5, 1.0]), "RoPE frame for D=128"),
                                  (-1, mx.array([]), "must carry the RoPE frame")):  # fmt: skip
        broken = list(state)
        broken[index] = value
        with pytest.raises(ValueError, match=message):
            TurboQuantKVCache.from_state(broken)
    with pytest.raises(ValueError, match="does not match a state"):
        TurboQuantKVCache.from_state(state[:-2])


def test_batch_and_sliding_caches_refuse_centred_keys():
    with pytest.raises(ValueError, match="centres keys in RoPE's frame, which batched"):
        BatchTurboQuantKVCache("turbo3c", left_padding=[0, 2])
    with pytest.raises(ValueError, match="centres keys in RoPE's frame, which sliding-window"):
        RotatingTurboQuantKVCache("turbo3c", max_size=64)
    frame = probe_rope(ROPES["default"](), D)
    single = _cache("turbo3c", frame)
    single.update_and_fetch(*(_centred_keys(20, 0, frame),) * 2)
    with pytest.raises(ValueError, match="which batched"):
        TurboQuantKVCache.merge([single, single])


def test_key_mean_and_mean_keys_agree_with_a_module_rope():
    rope = ROPES["default"]()
    frame = probe_rope(rope, D)
    mu = mx.random.normal((1, 2, 1, D), key=mx.random.key(4))
    turned = mean_keys(mu, frame, 50, 7)
    want = rope(mx.contiguous(mx.broadcast_to(mu, (1, 2, 7, D))), offset=50)  # CUDA: see mean_keys
    assert float(mx.abs(turned - want).max()) < 1e-3
    assert float(mx.abs(key_mean(turned, frame, 50)).max()) == 0.0  # fewer than 16 keys
    many = mean_keys(mu, frame, 50, 40)
    assert float(mx.abs(key_mean(many, frame, 50) - mu).max()) < 1e-3


class _Attention(nn.Module):
    def __init__(self, rope):
        super().__init__()
        if rope is not None:
            self.rope = rope
        self.head_dim = D


class _Layer(nn.Module):
    def __init__(self, rope):
        super().__init__()
        self.self_attn = _Attention(rope)


class _Model(nn.Module):
    def __init__(self, ropes):
        super().__init__()
        self.layers = [_Layer(r) for r in ropes]


def test_compress_cache_finds_each_layers_rope_and_says_where_it_cannot():
    model = _Model([nn.RoPE(D), None, _QuadraticRope(), nn.RoPE(D, traditional=True)])
    cache = [mlx_cache.KVCache() for _ in model.layers]
    plan = api.compress_cache(model, cache, "turbo3c", "all")
    assert [c.scheme.name for c in cache] == ["turbo3c", "turbo3", "turbo3", "turbo3c"]
    assert cache[3].rope_frame.traditional and not cache[0].rope_frame.traditional
    assert plan.uncentred == {
        "the layer has no rope module": [1],
        "_QuadraticRope does not act as a pairwise rotation linear in the position on 128 "
        "channels (checked at positions (1, 777, 5000))": [2],
    }
    from mlx_lm_turboquant.integration.report import describe

    assert "keys of 1 NOT centred (the layer has no rope module)" in describe(model, plan, "x")
    # A sliding-window layer keeps its scheme without the centring, and says so.
    cache = [mlx_cache.RotatingKVCache(max_size=64) for _ in model.layers]
    plan = api.compress_cache(model, cache, "turbo3cw4", "all")
    assert {c.scheme.name for c in cache} == {"turbo3"}
    assert plan.uncentred == {"sliding-window layer": [0, 1, 2, 3]}


def test_model_attention_through_a_centred_cache_matches_its_own_decode():
    # Through mlx-lm's dispatcher (the integration's patch), a centred cache's attention
    # is the dense attention on what the cache decodes.
    import mlx_lm_turboquant
    from mlx_lm.models import base

    mlx_lm_turboquant.activate()
    frame = probe_rope(ROPES["default"](), D)
    c = _cache("turbo4c", frame)
    k = _centred_keys(40, 0, frame)
    kh, vh = c.update_and_fetch(k, k)
    q = mx.random.normal((1, 4, 1, D), key=mx.random.key(8)).astype(mx.float16)
    got = base.scaled_dot_product_attention(q, kh, vh, cache=c, scale=D**-0.5, mask=None)
    kd, vd = c.dequantize()
    want = mx.fast.scaled_dot_product_attention(q.astype(mx.float32), kd, vd, scale=D**-0.5)
    assert float(mx.abs(got.astype(mx.float32) - want).max()) < 1e-2  # fp16 output
