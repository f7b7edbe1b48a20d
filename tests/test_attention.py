"""turboquant_sdpa against a float32 reference, judged by the rule of flash-attention's
tests: its error may be at most 2x that of "dequantize, then ordinary attention"."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm_turboquant import TurboQuantKVCache, schemes, turboquant_sdpa
from mlx_lm_turboquant.kernels.reference import reference_sdpa

T, D = 70, 128


def _setup(scheme, n_rep, L, seed=0, n_kv=2, dtype=mx.float32):
    keys = mx.random.normal((1, n_kv, T, D), key=mx.random.key(seed)) * 2.0
    values = mx.random.normal((1, n_kv, T, D), key=mx.random.key(seed + 1))
    queries = mx.random.normal((1, n_kv * n_rep, L, D), key=mx.random.key(seed + 2)).astype(dtype)
    cache = TurboQuantKVCache(scheme, layer_index=seed)
    cache.update_and_fetch(keys[:, :, : T - L], values[:, :, : T - L])
    cache.update_and_fetch(keys[:, :, T - L :], values[:, :, T - L :])
    return queries, keys, values, cache


def _mask(kind, n_q_heads, L, seed):
    if kind in (None, "causal"):
        return kind
    rng = np.random.default_rng(seed)
    if kind == "bool":
        m = rng.random((L, T)) < 0.7
        m[:, -1] = True  # every query sees at least one key
        return mx.array(m)
    return mx.array(rng.normal(size=(1, n_q_heads, L, T)).astype(np.float32))


def _errors(queries, keys, values, cache, mask, sinks):
    scale = D**-0.5
    q32 = queries.astype(mx.float32)
    exact = mx.fast.scaled_dot_product_attention(q32, keys, values, scale=scale, mask=mask, sinks=sinks)
    k_hat, v_hat = cache.dequantize()
    plain = mx.fast.scaled_dot_product_attention(q32, k_hat, v_hat, scale=scale, mask=mask, sinks=sinks)
    ours = turboquant_sdpa(queries, cache, scale=scale, mask=mask, sinks=sinks)
    assert ours.shape == queries.shape and ours.dtype == queries.dtype
    rms = lambda a: float(mx.sqrt(((a.astype(mx.float32) - exact) ** 2).mean()))  # noqa: E731
    return rms(ours), rms(plain)


@pytest.mark.parametrize("scheme", schemes())
def test_every_scheme_decode(scheme):
    q, k, v, cache = _setup(scheme, n_rep=2, L=1)
    ours, plain = _errors(q, k, v, cache, None, None)
    assert ours <= 2 * plain + 1e-6


@pytest.mark.parametrize("scheme", ["turbo4", "turbo3", "turbo0v4"])
@pytest.mark.parametrize("n_rep", [1, 2, 4])
@pytest.mark.parametrize("L", [1, 9])
@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_matrix(scheme, n_rep, L, mask, with_sinks):
    seed = n_rep * 10 + L
    q, k, v, cache = _setup(scheme, n_rep, L, seed=seed)
    sinks = mx.random.normal((q.shape[1],), key=mx.random.key(7)) if with_sinks else None
    ours, plain = _errors(q, k, v, cache, _mask(mask, q.shape[1], L, seed), sinks)
    assert ours <= 2 * plain + 1e-6


def test_blocks_and_query_chunks_do_not_change_the_result():
    q, _, _, cache = _setup("turbo3", n_rep=4, L=9)
    mask = _mask("bool", 8, 9, 0)
    # mlx's CUDA backend runs float32 matmuls in TF32 (10-bit mantissa): other block
    # sizes round differently there.
    atol = 2e-6 if mx.default_device() == mx.cpu else 5e-3
    one = reference_sdpa(q, cache, 0.1, mask=mask)
    many = reference_sdpa(q, cache, 0.1, mask=mask, block_tokens=16, block_queries=2)
    np.testing.assert_allclose(np.array(one), np.array(many), atol=atol)
    causal = reference_sdpa(q, cache, 0.1, mask="causal", block_tokens=16, block_queries=4)
    whole = reference_sdpa(q, cache, 0.1, mask="causal")
    np.testing.assert_allclose(np.array(causal), np.array(whole), atol=atol)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_queries(dtype):
    q, k, v, cache = _setup("turbo4", n_rep=2, L=3, dtype=dtype)
    ours, plain = _errors(q, k, v, cache, "causal", None)
    # The reference itself sees the rounded queries, so allow the rounding on top.
    assert ours <= 2 * plain + 1e-2


def test_errors():
    q, _, _, cache = _setup("turbo4", n_rep=1, L=1)
    with pytest.raises(ValueError, match="D=64"):
        turboquant_sdpa(q[..., :64], cache, 0.1)
    with pytest.raises(ValueError, match="at least one token"):
        turboquant_sdpa(q, TurboQuantKVCache("turbo4"), 0.1)
    with pytest.raises(ValueError, match="cannot share"):
        turboquant_sdpa(mx.zeros((1, 3, 1, D)), cache, 0.1)
