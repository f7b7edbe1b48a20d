"""End to end on tq-llama-8k, a small trained Llama (head_dim 128, GQA 2)."""

import itertools

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as mlx_cache

from mlx_lm_turboquant import TurboQuantKVCache, make_prompt_cache, schemes
from mlx_lm_turboquant.eval.kld import reference_run, teacher_forced_kl

pytestmark = pytest.mark.slow


def test_generation_with_every_scheme(real_model):
    model, tokenizer = real_model
    prompt = mx.array(tokenizer.encode("def fibonacci(n):\n    "))
    for scheme in schemes():
        cache = make_prompt_cache(model, scheme, layers="all")
        steps = generate_step(prompt, model, prompt_cache=cache, prefill_step_size=4)
        tokens = [int(t) for t, _ in itertools.islice(steps, 8)]
        assert len(tokens) == 8 and all(0 <= t < 4096 for t in tokens), scheme
        assert all(isinstance(c, TurboQuantKVCache) and c.offset == len(prompt) + 8 for c in cache)


@pytest.fixture(scope="module")
def reference_768(real_model, val_ids):
    """The uncompressed run the quality floors compare against (prefill 768, 256 steps)."""
    return reference_run(real_model[0], val_ids, prefill=768, steps=256)


def test_turbo4_quality_floor(real_model, val_ids, reference_768, monkeypatch):
    # The CI floor: prefill 768 tokens, 256 teacher-forced steps, against the
    # uncompressed cache. The default layers (every layer, the last at turbo8v4):
    # measured KL 0.0043, top-1 96.1% at 0.279x (docs/evaluation.md: 0.0046 and 97.5%
    # over four windows).
    monkeypatch.delenv("MLX_TQ_LAYERS", raising=False)
    model, _ = real_model
    ref = reference_768
    r = teacher_forced_kl(model, val_ids, "turbo4", prefill=768, steps=256, reference=ref)
    assert r.kl_mean < 0.01 and r.top1_agreement > 0.95
    assert r.kv_bytes < 0.28 * r.kv_bytes_reference  # 5 layers at 0.258x, one at 0.383x
    # Every layer turbo4, the last 16 tokens also fp16 (the issue-6 turbo4 candidate):
    # measured KL 0.0019, top-1 98.4% at 0.273x (four windows: 0.0030, 98.2%).
    r = teacher_forced_kl(model, val_ids, "turbo4w16", "all", prefill=768, steps=256,
                          reference=ref)  # fmt: skip
    assert r.kl_mean < 0.005 and r.top1_agreement > 0.97
    assert r.kv_bytes < 0.28 * r.kv_bytes_reference


def test_turbo3_5_quality_floor(real_model, val_ids, reference_768, monkeypatch):
    # The outlier split's CI floor, same window, default layers (the last at turbo8v4):
    # measured 0.0063 (top-1 94.9%, 0.261x), between turbo4 (0.0043) and turbo3; with
    # the last layer fp16 it was 0.0061 at 0.364x (docs/evaluation.md).
    monkeypatch.delenv("MLX_TQ_LAYERS", raising=False)
    r = teacher_forced_kl(real_model[0], val_ids, "turbo3.5", prefill=768, steps=256,
                          reference=reference_768)  # fmt: skip
    assert r.kl_mean < 0.012 and r.top1_agreement > 0.94
    assert r.kv_bytes < 0.27 * r.kv_bytes_reference  # 5 layers at 0.234x, one at 0.383x


def test_turbo3_class_quality_floor(real_model, val_ids, reference_768):
    # The turbo3-class candidate of issue 6: keys centred in RoPE's frame, every layer at
    # 3 bits but the last at turbo4v3, the last 8 tokens also fp16. Same window as above;
    # measured KL 0.0054 and top-1 98.0% at 0.2096x (four windows: 0.0073, 96.7%;
    # docs/evaluation.md, lever (g)).
    r = teacher_forced_kl(real_model[0], val_ids, "turbo3cw8", "-1=turbo4v3", prefill=768,
                          steps=256, reference=reference_768)  # fmt: skip
    assert r.kl_mean < 0.009 and r.top1_agreement > 0.95
    assert r.kv_bytes <= 0.21 * r.kv_bytes_reference


def test_centring_shrinks_the_real_models_key_error(real_model, val_ids):
    # On this model a head's keys share a large mean before RoPE (75-80% of their energy in
    # layers 1-4): centred in RoPE's frame, 3-bit keys keep a fraction of the error.
    model, _ = real_model
    prompt = mx.array(val_ids[None, :512])
    errors = {}
    for scheme in ("turbo3", "turbo3c"):
        cache = make_prompt_cache(model, scheme, layers="all")
        reference = [mlx_cache.KVCache() for _ in model.layers]
        model(prompt, cache=cache)
        model(prompt, cache=reference)
        errors[scheme] = []
        for c, ref in zip(cache, reference):
            keys = ref.keys[..., : ref.offset, :]
            errors[scheme].append(float(((c.dequantize()[0] - keys) ** 2).sum() / (keys**2).sum()))
    for layer in range(1, 5):
        assert errors["turbo3c"][layer] < 0.5 * errors["turbo3"][layer], errors
