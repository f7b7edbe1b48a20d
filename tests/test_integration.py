"""The mlx-lm seams in this process: registry of switches, the kv_scheme= keyword,
the report, scheme precedence, speculative decoding, perplexity through the cache."""

import sys

import mlx.core as mx
import pytest
from mlx_lm.models import cache as mlx_cache
from test_prompt_cache_files import tiny_llama

import mlx_lm_turboquant as tq
from mlx_lm_turboquant import integration
from mlx_lm_turboquant.integration import cli_patch, state


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    for var in ("MLX_TQ_SCHEME", "MLX_TQ_LAYERS", "MLX_TQ_QUIET"):
        monkeypatch.delenv(var, raising=False)
    state.set_cli(None)
    yield
    state.set_cli(None)


def _import_commands():
    import importlib

    for name in ("chat", "cache_prompt", "benchmark", "server", "perplexity"):
        importlib.import_module(f"mlx_lm.{name}")


def test_registry_and_switches_agree():
    """Liger-style: every seam in the registry turns on and off, exactly."""
    import mlx_lm.generate  # noqa: F401
    from mlx_lm.models import base, llama

    _import_commands()
    gen = sys.modules["mlx_lm.generate"]
    tq.activate()
    tq.activate()  # idempotent: no double wrapping
    on = integration.installed()
    assert all(on[k] for k in on if k != "cli.evaluate"), on  # evaluate needs lm_eval
    assert not hasattr(mlx_cache.make_prompt_cache._tq_original, "_tq_original")
    wrapped = mlx_cache.make_prompt_cache
    assert (
        gen.make_prompt_cache is wrapped
        and sys.modules["mlx_lm.server"].make_prompt_cache is wrapped
    )
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention

    tq.deactivate()
    try:
        assert not any(integration.installed().values())
        original = wrapped._tq_original
        assert mlx_cache.make_prompt_cache is original and gen.make_prompt_cache is original
        assert sys.modules["mlx_lm.chat"].make_prompt_cache is original
        assert not hasattr(mlx_cache, "TurboQuantKVCache")
        assert not getattr(llama.scaled_dot_product_attention, "_turboquant", False)
        for seam in integration.SEAMS.values():  # each switch alone
            seam.install()
            assert seam.is_installed() or seam is integration.SEAMS["cli.evaluate"]
            seam.uninstall()
            assert not seam.is_installed()
    finally:
        tq.activate()
    assert integration.installed()["make_prompt_cache"]


def test_kv_scheme_keyword_on_generate_step(patched, model, capsys):
    from mlx_lm.generate import generate_step

    prompt = mx.array([1, 2, 3, 4, 5])
    cache = mlx_cache.make_prompt_cache(model)
    assert [type(c).__name__ for c in cache] == ["KVCache"] * 3  # nothing active
    tokens = [t for t, _ in generate_step(prompt, model, max_tokens=4, kv_scheme="turbo4",
                                          kv_layers="1:")]  # fmt: skip
    assert len(tokens) == 4
    err = capsys.readouterr().err
    assert "turbo4 (kv_scheme=) on 2/3 layers [1-2]; kept 0 (layers '1:')" in err
    # Per layer: fp16 2 heads x (64 + 64) x 2 B = 512; turbo4 2 x 2 x (32 + 2) = 136.
    assert "KV 784 B/token vs 1,536 fp16" in err

    with pytest.raises(ValueError, match="both compress the KV cache"):
        generate_step(prompt, model, kv_scheme="turbo4", kv_bits=4)
    with pytest.raises(ValueError, match="kv_scheme=: unknown KV scheme 'turbo7'"):
        generate_step(prompt, model, kv_scheme="turbo7")
    with pytest.raises(ValueError, match="made without a KV scheme but kv_scheme='turbo4'"):
        generate_step(prompt, model, kv_scheme="turbo4", prompt_cache=cache)
    with pytest.raises(ValueError, match="holds a turbo3 cache but kv_scheme='turbo4'"):
        generate_step(
            prompt, model, kv_scheme="turbo4", prompt_cache=tq.make_prompt_cache(model, "turbo3")
        )
    with pytest.raises(ValueError, match="kv_layers= needs kv_scheme="):
        generate_step(prompt, model, kv_layers="1:")


def test_generate_and_stream_generate_pass_the_keyword(patched, real_model, capsys):
    from mlx_lm import generate, stream_generate

    model, tokenizer = real_model
    text = generate(model, tokenizer, "Once upon a time", max_tokens=6, kv_scheme="turbo3")
    assert text and "turbo3 (kv_scheme=) on" in capsys.readouterr().err
    pieces = [
        r.text for r in stream_generate(model, tokenizer, "Hi", max_tokens=4, kv_scheme="turbo2")
    ]
    assert len(pieces) == 4 and "turbo2 (kv_scheme=)" in capsys.readouterr().err


def test_batch_generation_says_it_cannot_yet(patched, model, monkeypatch):
    from mlx_lm.generate import BatchGenerator, batch_generate

    from mlx_lm_turboquant.integration import generate_patch

    if not generate_patch.batch_support_missing():
        pytest.skip("batch TurboQuant caches exist")

    class Tok:
        eos_token_ids = {0}

    with pytest.raises(ValueError, match="needs batch TurboQuant caches"):
        batch_generate(model, Tok(), [[1, 2, 3]], max_tokens=2, kv_scheme="turbo4")
    monkeypatch.setenv("MLX_TQ_SCHEME", "turbo4")
    with pytest.raises(ValueError, match="MLX_TQ_SCHEME turbo4: batch generation"):
        BatchGenerator(model)
    BatchGenerator(model, kv_scheme="none").close()  # explicit "none" wins over the env


def test_env_var_reaches_plain_mlx_lm_calls(patched, model, monkeypatch, capsys):
    monkeypatch.setenv("MLX_TQ_SCHEME", "turbo3")
    monkeypatch.setenv("MLX_TQ_LAYERS", "0")
    cache = mlx_cache.make_prompt_cache(model)
    assert [type(c).__name__ for c in cache] == ["TurboQuantKVCache", "KVCache", "KVCache"]
    assert (
        "turbo3 (MLX_TQ_SCHEME) on 1/3 layers [0]; kept 1-2 (layers '0')" in capsys.readouterr().err
    )
    monkeypatch.setenv("MLX_TQ_QUIET", "1")
    mlx_cache.make_prompt_cache(model)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MLX_TQ_SCHEME", "turbo11")
    with pytest.raises(ValueError, match="MLX_TQ_SCHEME: unknown KV scheme 'turbo11'"):
        mlx_cache.make_prompt_cache(model)


def test_precedence_keyword_then_flag_then_env(monkeypatch):
    monkeypatch.setenv("MLX_TQ_SCHEME", "turbo2")
    assert state.active().source == "MLX_TQ_SCHEME"
    state.set_cli(state.select("turbo3", source="--kv-scheme"))
    assert state.active().scheme.name == "turbo3"
    with state.using(state.select("none")):
        assert state.active().scheme is None
    with state.using(state.select("turbo4", "1:")):
        assert (state.active().scheme.name, state.active().layers) == ("turbo4", "1:")
    assert state.active().scheme.name == "turbo3"


def test_a_scheme_that_cannot_take_effect_says_so_even_when_quiet(patched, monkeypatch, capsys):
    monkeypatch.setenv("MLX_TQ_QUIET", "1")

    class Chunked:  # a model whose every layer is chunked attention
        layers = [object()] * 3

        def make_cache(self):
            return [mlx_cache.ChunkedKVCache(chunk_size=8) for _ in self.layers]

    with state.using(state.select("turbo4", source="--kv-scheme")):
        cache = mlx_cache.make_prompt_cache(Chunked())
    assert all(type(c).__name__ == "ChunkedKVCache" for c in cache)
    err = capsys.readouterr().err
    assert (
        "turbo4 NOT applied (--kv-scheme): no layer can take it (kept 0-2 (ChunkedKVCache))" in err
    )

    class Model:  # an MLA family: its plain KVCache holds latents
        layers = [object(), object()]

    Model.__module__ = "mlx_lm.models.deepseek_v3"
    with state.using(state.select("turbo4", source="--kv-scheme")):
        cache = mlx_cache.make_prompt_cache(Model())
    assert [type(c).__name__ for c in cache] == ["KVCache", "KVCache"]
    assert (
        "turbo4 NOT applied (--kv-scheme): deepseek_v3 caches MLA latents"
        in capsys.readouterr().err
    )


def _greedy(model, prompt, n, **kwargs):
    from mlx_lm.generate import generate_step

    return [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, **kwargs)]


def test_turbo0v4_greedy_equals_fp16_greedy_for_32_tokens(real_model, val_ids):
    model, _ = real_model
    prompt = val_ids[:64].tolist()
    plain = _greedy(model, prompt, 32)
    assert _greedy(model, prompt, 32, kv_scheme="turbo0v4", kv_layers="all") == plain


def test_speculative_decoding_compresses_both_caches_and_trims_exactly(real_model, val_ids, capsys):
    from mlx_lm.generate import speculative_generate_step
    from mlx_lm.models import llama

    model, _ = real_model
    # A random draft model: most drafts are rejected, so trimming is exercised a lot.
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
        vocab_size=model.args.vocab_size,
    )  # fmt: skip
    mx.random.seed(1)
    draft = llama.Model(args)
    prompt = mx.array(val_ids[:48].tolist())
    reference = _greedy(model, prompt.tolist(), 24, kv_scheme="turbo4")
    capsys.readouterr()

    def run(cache, **kwargs):
        out = speculative_generate_step(prompt, model, draft, num_draft_tokens=3, max_tokens=24,
                                        prompt_cache=cache, **kwargs)  # fmt: skip
        return [(t, from_draft) for t, _, from_draft in out]

    out = run(None, kv_scheme="turbo4")
    assert [t for t, _ in out] == reference  # rejected drafts left no trace in the cache
    assert not all(d for _, d in out)  # some drafts were rejected
    err = capsys.readouterr().err
    assert "model: turbo4 (kv_scheme=) on" in err and "draft: turbo4 (kv_scheme=) on" in err

    # After the run, both compressed caches hold exactly as many tokens as plain ones.
    n = len(model.layers)
    tq_cache = tq.make_prompt_cache(model, "turbo4", "all") + tq.make_prompt_cache(
        draft, "turbo4", "all"
    )
    plain_cache = mlx_cache.make_prompt_cache(model) + mlx_cache.make_prompt_cache(draft)
    assert [t for t, _ in run(tq_cache)] == reference
    run(plain_cache)
    assert all(type(c).__name__ == "TurboQuantKVCache" for c in tq_cache)
    assert [c.offset for c in tq_cache] == [c.offset for c in plain_cache]
    assert len(tq_cache) == n + 2


def test_perplexity_through_the_cache_matches_mlx_lm_without_a_scheme(real_model, val_ids):
    import mlx_lm.perplexity as ppl

    from mlx_lm_turboquant.integration.perplexity_patch import eval_ppl_through_cache

    model, _ = real_model
    data = mx.array(val_ids[: 4 * 96].reshape(4, 96))
    original = ppl.eval_ppl.__wrapped__ if hasattr(ppl.eval_ppl, "_tq_original") else ppl.eval_ppl
    expected, _ = original(model, data, batch_size=2)
    chunked, _ = eval_ppl_through_cache(model, data, batch_size=2, chunk_size=32, selection=None)
    assert chunked == pytest.approx(expected, rel=1e-4)
    compressed, _ = eval_ppl_through_cache(model, data, 2, 32, state.select("turbo2"))
    assert compressed > expected


@pytest.mark.parametrize(
    "argv, command",
    [
        (["python", "-m", "mlx_lm.generate", "--model", "m"], "generate"),
        (["python", "-X", "importtime", "-m", "mlx_lm.server"], "server"),
        (["python", "-m", "mlx_lm", "generate"], None),  # cli.py imports the real module
        (["python", "script.py", "-m", "mlx_lm.generate"], None),
        (["python", "-c", "pass", "-m", "mlx_lm.chat"], None),
        (["python", "-m", "mlx_lm.convert"], None),
    ],
)
def test_python_dash_m_command_detection(monkeypatch, argv, command):
    monkeypatch.setattr(sys, "orig_argv", argv)
    assert cli_patch.main_module_command() == command


def test_the_dash_m_parse_hook_is_one_shot_and_reversible():
    import argparse

    plain = argparse.ArgumentParser.parse_args
    cli_patch.install_for_main_module("chat")
    try:
        parser = argparse.ArgumentParser()
        args = parser.parse_args(["--kv-scheme", "none"])
        assert args.kv_scheme == "none" and argparse.ArgumentParser.parse_args is plain
        assert state.active().scheme is None and state.active().source == "--kv-scheme"
        cli_patch.install_for_main_module("chat")
        tq.deactivate()
        assert argparse.ArgumentParser.parse_args is plain
    finally:
        argparse.ArgumentParser.parse_args = plain
        tq.activate()


def test_evaluate_scores_through_compressed_caches(monkeypatch, capsys):
    """mlx_lm.evaluate's log-likelihood path (lm_eval replaced by tests/stubs)."""
    from pathlib import Path

    from conftest import TEST_MODEL, _require

    _require(TEST_MODEL)
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "stubs"))
    from mlx_lm.evaluate import MLXLM

    tq.activate()
    lm = MLXLM(str(TEST_MODEL), use_chat_template=False)

    class Request:
        def __init__(self, context, continuation):
            self.args = (context, continuation)

    requests = [Request("Once upon a time", " there was a"), Request("The cat", " sat on the mat")]

    def scores(scheme):
        with state.using(state.select(scheme, "all", "--kv-scheme")):
            return [s for s, _ in lm.loglikelihood(requests)]

    plain = scores("none")
    assert "mlx-lm-turboquant" not in capsys.readouterr().err
    turbo2 = scores("turbo2")
    assert "turbo2 (--kv-scheme) on 6/6 layers" in capsys.readouterr().err
    assert turbo2 != plain  # the compressed cache is what got scored
