"""Batched vs alone: why a prompt's greedy text can differ (issue #4, docs/server.md).

With every layer turbo4, ``mlx_lm.server`` on tq-llama-8k (float16 weights) continues
"def fibonacci(n):" differently when it is served with seven other requests than alone. The
mechanism pinned here: a row prefilled inside a right-padded chunk stores the very codes it
stores alone, but the reference attention's matmuls run over the chunk's shape, so its output
differs from the alone run by float32 rounding (~1e-7); cast to float16 a few elements land
one ulp apart, later layers' keys and values move by float16 ulps, a handful of codes that
sat on a bucket boundary flip to the neighbouring centroid, and the logits drift by up to
~0.1 nat, which decides a step whose top-2 margin is 0.008 nat. A batch cache that stored a
wrong row, offset or padding would break the exact checks below, not only the tolerances.
"""

import copy
import importlib.util

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, TEST_MODEL, _require

from mlx_lm_turboquant.attention import turboquant_sdpa
from mlx_lm_turboquant.batch_cache import BatchTurboQuantKVCache
from mlx_lm_turboquant.cache import TurboQuantKVCache

H, D = 2, 128


def _rand(shape, seed):
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float16))


def _right_padded(x, T):
    return mx.concatenate([x, mx.zeros((*x.shape[:2], T - x.shape[2], x.shape[3]), x.dtype)], 2)


def test_a_padded_prefill_changes_attention_only_by_rounding(monkeypatch):
    """The first layer's situation: 8 prompt tokens prefilled alone, and as the short row
    of a chunk right-padded to a 467-token row (what BatchGenerator does). The pure-MLX
    attention (the CPU path) is the one measured here."""
    monkeypatch.setenv("MLX_TQ_KERNELS", "reference")
    n, T = 8, 467
    k, v, q = _rand((1, H, n, D), 1), _rand((1, H, n, D), 2), _rand((1, 2 * H, n, D), 3)
    alone = TurboQuantKVCache("turbo4", 0)
    alone.update_and_fetch(k, v)
    expected = np.array(turboquant_sdpa(q.astype(mx.float32), alone, D**-0.5, mask="causal"))

    rows = []
    for seed in (10, 20):  # two different long rows beside it
        batch = BatchTurboQuantKVCache("turbo4", [0, 0], 0)
        batch.prepare(lengths=[n, T], right_padding=[T - n, 0])
        mask = batch.make_mask(T)
        keys = mx.concatenate([_right_padded(k, T), _rand((1, H, T, D), seed)])
        values = mx.concatenate([_right_padded(v, T), _rand((1, H, T, D), seed + 1)])
        queries = mx.concatenate([_right_padded(q, T), _rand((1, 2 * H, T, D), seed + 2)])
        batch.update_and_fetch(keys, values)
        out = turboquant_sdpa(queries.astype(mx.float32), batch.attention_cache(), D**-0.5,
                              mask=mask)  # fmt: skip
        rows.append(np.array(out[:1, :, :n]))
        batch.finalize()  # the padding moves to the left; the row keeps its exact bits
        for got, want in zip(batch.extract(0).fetch(), alone.fetch()):
            assert mx.array_equal(got, want).item()

    # The row never sees the other row's content, bit for bit ...
    np.testing.assert_array_equal(rows[0], rows[1])
    # ... but the chunk's shape changes the rounding: float32 noise, no more.
    scale = np.abs(expected).max()
    np.testing.assert_allclose(rows[0], expected, rtol=0, atol=1e-6 * scale)


# -- the server's case on the real model ----------------------------------------------


def _diagnosis():
    path = ROOT / "benchmarks" / "batch_divergence.py"
    spec = importlib.util.spec_from_file_location("batch_divergence", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _attention_bound(c_alone, c_batched, n, seed):
    """Decode-step attention over the first ``n`` tokens of two caches with the same queries:
    the observed difference and the bound the decoded K/V differences allow,
    ``max|dv| + 2 max|ds| max|v|`` (softmax moves at most 2 max|ds| of probability mass)."""
    a, b = copy.deepcopy(c_alone), copy.deepcopy(c_batched)
    a.trim(a.offset - n)
    b.trim(b.offset - n)
    n_q = 2 * a.values.shape[1]
    q = mx.array(np.random.default_rng(seed).standard_normal((1, n_q, 1, a.k_dim)) * 3,
                 dtype=mx.float32)  # fmt: skip
    scale = a.k_dim**-0.5
    diff = np.abs(np.array(turboquant_sdpa(q, a, scale) - turboquant_sdpa(q, b, scale))).max()
    (ka, va), (kb, vb) = a.dequantize(), b.dequantize()
    grouped = q.reshape(1, a.values.shape[1], 2, a.k_dim)
    ds = np.abs(np.array(grouped @ (ka - kb).swapaxes(-1, -2))).max() * scale
    bound = np.abs(np.array(va - vb)).max() + 2 * ds * np.abs(np.array(vb)).max()
    return diff, bound


@pytest.mark.slow
def test_batched_row_differs_from_alone_only_by_neighbouring_code_flips(monkeypatch):
    """BatchGenerator with the server's sizes, turbo4 on every layer, float16 weights (as
    mlx_lm.server loads tq-llama-8k): 'def fibonacci(n):' alone and as one of the eight
    requests of test_server_batching.py, compared over the positions both runs fed the
    same tokens. Pure-MLX path: its encode is what the exact checks re-run."""
    _require(TEST_MODEL)
    monkeypatch.setenv("MLX_TQ_KERNELS", "reference")
    from mlx_lm import load

    import mlx_lm_turboquant

    mlx_lm_turboquant.activate()
    model, tokenizer = load(str(TEST_MODEL))
    assert model.layers[0].self_attn.k_proj.weight.dtype == mx.float16
    bd = _diagnosis()
    ids = [tokenizer.encode(p) for p in bd.PROMPTS]
    (alone,), rec_alone = bd.run_generator(model, [ids[1]], "turbo4", "all", 12, 2048)
    batched, rec_batched = bd.run_generator(model, ids, "turbo4", "all", 12, 2048)
    r = bd.compare_runs(alone, rec_alone, batched[1], rec_batched, len(ids[1]),
                        len(model.layers))  # fmt: skip
    layers = r["layers"]
    assert r["positions_compared"] >= len(ids[1])

    for row in layers:
        # Both caches hold exactly the encoding of what their own row fed them, at the
        # right positions: merge, the right-padded prefill, finalize's roll, split / extend
        # with the one-token request and extract moved every row intact.
        for part in ("key", "value"):
            assert row[f"{part}_exact_alone"] and row[f"{part}_exact_batched"], row
    # The first layer is fed the same keys and values bit for bit and stores the same codes;
    # its attention output differs by float32 rounding only (the padded prefill's shape).
    first = layers[0]
    assert first["raw_key_maxdiff"] == first["raw_value_maxdiff"] == 0
    assert first["key_flipped"] == first["value_flipped"] == 0
    assert first["attn_f32_maxdiff"] <= 1e-6 * first["attn_f32_maxabs"]
    for row in layers:
        for part in ("key", "value"):
            # Few codes differ, each by one centroid index (a boundary flip), and each
            # decoded vector moves by at most one quantization step per coordinate.
            assert row[f"{part}_flipped"] <= 0.02 * row[f"{part}_codes"], row
            assert row[f"{part}_index_step_max"] <= 1, row
            assert row[f"{part}_decoded_maxdiff_steps"] <= 1.0, row
        # The inputs that flipped them differ by float16 noise, not by whole vectors.
        assert row["raw_key_maxdiff"] <= 0.05 * row["raw_key_maxabs"], row
        assert row["raw_value_maxdiff"] <= 0.05 * row["raw_value_maxabs"], row
        c_alone, c_batched = alone["cache"][row["layer"]], batched[1]["cache"][row["layer"]]
        diff, bound = _attention_bound(c_alone, c_batched, r["positions_compared"], row["layer"])
        assert diff <= bound + 1e-5, (row["layer"], diff, bound)
    # The log-probabilities drift by a fraction of a nat (0.10 at most here): enough to
    # decide a near-tie (the alone run's top-2 margin is 0.008 nat at the step that differs),
    # too little to change any step with a clear winner.
    assert max(r["logprob_maxdiff"]) < 0.3
