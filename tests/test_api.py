import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models import llama

import mlx_lm_turboquant as tq
from mlx_lm_turboquant import TurboQuantKVCache, make_prompt_cache
from mlx_lm_turboquant.api import base_make_prompt_cache, compress_cache
from mlx_lm_turboquant.rotating_cache import RotatingTurboQuantKVCache


def _tiny_llama(layer_types=None, n_layers=4):
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=n_layers, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
        vocab_size=97, layer_types=layer_types, sliding_window=8 if layer_types else None,
    )  # fmt: skip
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def test_default_protects_the_last_attention_layer(monkeypatch):
    monkeypatch.delenv("MLX_TQ_LAYERS", raising=False)
    cache = make_prompt_cache(_tiny_llama(), "turbo3")
    assert [type(c) for c in cache] == [TurboQuantKVCache] * 4
    assert [c.layer_index for c in cache] == [0, 1, 2, 3]
    assert [c.scheme.name for c in cache] == ["turbo3"] * 3 + ["turbo8v4"]
    # fp16 keys stay fp16; values rise to 4 bits; a scheme already there is unchanged
    assert make_prompt_cache(_tiny_llama(), "turbo0v3")[-1].scheme.name == "turbo0v4"
    assert make_prompt_cache(_tiny_llama(), "turbo8v4")[-1].scheme.name == "turbo8v4"
    # Too few attention layers to spare one: all get the plain scheme.
    cache = make_prompt_cache(_tiny_llama(n_layers=3), "turbo3")
    assert [c.scheme.name for c in cache] == ["turbo3"] * 3


def test_per_layer_schemes(monkeypatch):
    monkeypatch.delenv("MLX_TQ_LAYERS", raising=False)
    cache = make_prompt_cache(_tiny_llama(), "turbo4", layers="0=turbo2,-1=fp16")
    assert [getattr(c, "scheme", None) and c.scheme.name for c in cache] == [
        "turbo2", "turbo4", "turbo4", None]  # fmt: skip
    assert type(cache[-1]) is mlx_cache.KVCache


def test_layer_spec_and_env(monkeypatch):
    model = _tiny_llama()
    kinds = lambda cache: [type(c).__name__[0] for c in cache]  # noqa: E731
    assert kinds(make_prompt_cache(model, layers="1:-1")) == list("KTTK")
    monkeypatch.setenv("MLX_TQ_LAYERS", "0")
    assert kinds(make_prompt_cache(model)) == list("TKKK")
    assert kinds(make_prompt_cache(model, layers="all")) == list("TTTT")
    with pytest.raises(ValueError, match="out of range"):
        make_prompt_cache(model, layers="4")
    with pytest.raises(ValueError, match="unknown KV scheme"):
        make_prompt_cache(model, "turbo9")


def test_sliding_window_layers_are_compressed_and_counted_by_layer_specs(monkeypatch):
    monkeypatch.delenv("MLX_TQ_LAYERS", raising=False)
    model = _tiny_llama(["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    cache = make_prompt_cache(model, "turbo4", layers="all")
    assert [type(c).__name__ for c in cache] == [
        "RotatingTurboQuantKVCache", "TurboQuantKVCache",
        "RotatingTurboQuantKVCache", "TurboQuantKVCache",
    ]  # fmt: skip
    plain = base_make_prompt_cache(model)
    assert [(c.max_size, c.keep) for c in cache[::2]] == [(c.max_size, c.keep) for c in plain[::2]]
    # Layer specs count every eligible layer, sliding ones included: "-1" is the last.
    cache = make_prompt_cache(model, "turbo4", layers="-1")
    assert [type(c).__name__ for c in cache] == [
        "RotatingKVCache", "KVCache", "RotatingKVCache", "TurboQuantKVCache",
    ]  # fmt: skip
    cache = make_prompt_cache(model, "turbo4", layers="0")
    assert type(cache[0]).__name__ == "RotatingTurboQuantKVCache"
    # The default gives the last eligible layer turbo8v4 (4 eligible layers here).
    cache = make_prompt_cache(model, "turbo4")
    assert [c.scheme.name for c in cache] == ["turbo4", "turbo4", "turbo4", "turbo8v4"]
    # A recent-token window applies to full-attention layers; sliding ones get the scheme
    # without it, and the plan records that.
    cache = base_make_prompt_cache(model)
    plan = compress_cache(model, cache, "turbo4w16", layers="all")
    assert [c.scheme.name for c in cache] == ["turbo4", "turbo4w16", "turbo4", "turbo4w16"]
    assert {i: s.name for i, s in plan.overrides.items()} == {0: "turbo4", 2: "turbo4"}
    with pytest.raises(ValueError, match="sliding-window caches do not"):
        RotatingTurboQuantKVCache("turbo4w16", max_size=8)


def test_other_cache_types_are_left_alone():
    class Mixed:
        layers = [object()] * 3

        def make_cache(self):
            return [mlx_cache.ChunkedKVCache(8), mlx_cache.ArraysCache(2), mlx_cache.KVCache()]

    cache = base_make_prompt_cache(Mixed())
    plan = compress_cache(Mixed(), cache, "turbo4")
    assert [type(c).__name__ for c in cache] == ["ChunkedKVCache", "ArraysCache", "TurboQuantKVCache"]
    assert plan.kept == {"ChunkedKVCache": [0], "ArraysCache": [1]}


@pytest.mark.parametrize("layer_types", [None, ["sliding_attention", "full_attention"] * 2])
def test_generation_on_a_random_model(patched, layer_types):
    model = _tiny_llama(layer_types)
    prompt = mx.array([1, 5, 9, 13, 2, 7, 3, 11, 4, 6, 8, 10])
    cache = make_prompt_cache(model, "turbo4", layers="all")
    steps = generate_step(prompt, model, prompt_cache=cache, prefill_step_size=5)
    tokens = [t for t, _ in itertools.islice(steps, 12)]
    assert len(tokens) == 12
    tq_layers = [c for c in cache if isinstance(c, TurboQuantKVCache)]
    # generate_step computes one token ahead of what it has yielded.
    assert tq_layers and all(c.offset == len(prompt) + 12 for c in tq_layers)


def test_schemes_listing():
    assert "turbo4" in tq.schemes() and "turbo0v4" in tq.schemes()


def test_dispatcher_patch_is_idempotent_and_reversible():
    from mlx_lm.models import base

    tq.deactivate()
    original = base.scaled_dot_product_attention
    assert llama.scaled_dot_product_attention is original
    tq.activate()
    tq.activate()
    patched_fn = base.scaled_dot_product_attention
    assert patched_fn is not original and patched_fn.__wrapped__ is original
    assert llama.scaled_dot_product_attention is patched_fn  # the copy in the model module
    tq.deactivate()
    assert base.scaled_dot_product_attention is original is llama.scaled_dot_product_attention
    tq.activate()
    # Plain caches still go to mlx's own attention.
    q = mx.random.normal((1, 2, 1, 8))
    k = v = mx.random.normal((1, 2, 4, 8))
    out = base.scaled_dot_product_attention(q, k, v, cache=mlx_cache.KVCache(), scale=1.0, mask=None)
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=None)
    np.testing.assert_allclose(np.array(out), np.array(ref), atol=1e-6)


def test_report_names_the_overridden_layers(monkeypatch):
    from mlx_lm_turboquant.api import base_make_prompt_cache, compress_cache
    from mlx_lm_turboquant.integration.report import describe

    monkeypatch.delenv("MLX_TQ_LAYERS", raising=False)
    model = _tiny_llama()
    plan = compress_cache(model, base_make_prompt_cache(model), "turbo3")
    line = describe(model, plan, "test")
    # 3 layers of 2 heads at (26 + 26) B and one at (66 + 34) B; fp16: 4 * 2 * 256 B
    assert "turbo3 (test) on 4/4 layers [0-3]; 3 as turbo8v4; KV 512 B/token vs 2,048" in line
