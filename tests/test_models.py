"""Every model type mlx-lm ships, as a tiny random instance, generating through turbo4.

For each: either its eligible full-attention layers are compressed and generation runs
through them (every compressed layer holds every token, logits stay finite), or no
layer is compressed and the plan states why. A crash fails the test.

``python tests/test_models.py`` prints the table kept in docs/models.md.
"""

import importlib
import pkgutil
import sys

import mlx.core as mx
import pytest

pytestmark = pytest.mark.slow

# mlx_lm/models modules that are not model types.
HELPERS = {
    "activations", "base", "bitlinear_layers", "cache", "gated_delta", "mla", "pipeline",
    "rope_utils", "ssm", "switch_layers",
}  # fmt: skip

# One small value per argument name; ``ModelArgs.from_dict`` keeps the names it knows.
SMALL = dict(
    hidden_size=64, d_model=64, n_embd=64, model_dim=64, hidden_dim=64, dim=64,
    num_hidden_layers=4, num_layers=4, n_layers=4, n_layer=4, num_transformer_layers=4,
    intermediate_size=128, ffn_hidden_size=128, n_inner=128, mlp_hidden_size=128,
    ff_intermediate_size=128, intermediate_size_mlp=128, expert_ffn_hidden_size=32,
    moe_intermediate_size=32, shared_intermediate_size=32, shared_expert_intermediate_size=32,
    num_attention_heads=4, n_heads=4, n_head=4, num_heads=4, num_query_heads=4,
    num_key_value_heads=2, n_kv_heads=2, num_kv_heads=2, num_attention_groups=2,
    multi_query_group_num=2, head_dim=16, vocab_size=128, embedding_size=128,
    rms_norm_eps=1e-5, layer_norm_eps=1e-5, layer_norm_epsilon=1e-5, norm_eps=1e-5,
    layernorm_epsilon=1e-5, rope_theta=10000.0, rotary_emb_base=10000, swa_rope_theta=10000.0,
    max_position_embeddings=512, n_positions=512, n_ctx=512, block_size=512,
    model_max_length=512, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    use_bias=False, use_qkv_bias=False, use_conv_bias=True, conv_bias=False, bias=False,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, moe_topk=2, n_shared_experts=1, num_shared_experts=1,
    num_shared_expert=1, first_k_dense_replace=1, norm_topk_prob=True,
    routed_scaling_factor=1.0, n_group=1, topk_group=1, topk_method="noaux_tc",
    scoring_func="sigmoid", decoder_sparse_step=1, mlp_only_layers=[], moe_layer_freq=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    index_head_dim=16, index_n_heads=2, index_topk=4, partial_rotary_factor=0.5,
    rotary_pct=0.5, rotary_dim=8, sliding_window=8, sliding_window_size=8,
    attention_window_size=8, rope_scaling=None, logits_scaling=1.0, attention_multiplier=0.25,
    embedding_multiplier=1.0, residual_multiplier=1.0, scale_depth=1.0, scale_emb=1.0,
    dim_model_base=64, post_norm=False, qk_norm=False, use_qk_norm=False,
    conv_kernel=4, conv_window=4, conv1d_width=4, conv_L_cache=3,
    state_size=8, ssm_state_size=8, time_step_rank=4, n_groups=1, mamba_d_conv=4,
    mamba_d_state=8, mamba_expand=2, mamba_num_heads=4, mamba_head_dim=16,
    mamba_proj_bias=False, time_step_limit=(0.0, float("inf")), linear_num_value_heads=2,
    linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, linear_allow_neg_eigval=False, a_low_rank_dim=8,
    v_low_rank_dim=8, gate_low_rank_dim=8, decay_low_rank_dim=8, block_dim=64,
    block_multiple_of=16, block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=False,
    ffn_dim_divisor=16, ffn_multipliers=[1.0, 1.0], gegelu_limit=20.0,
    dense_attention_every_n_layers=2, logits_soft_cap=30.0, use_cla=False,
    cla_share_factor=1, use_mixed_mlp_moe=False, num_kv_reuse_layers=0, zero_expert_num=0,
    zero_expert_type="identity", attention_method="MLA", mla_scale_q_lora=True,
    mla_scale_kv_lora=True, layer_group_size=2, group_norm_size=1, use_expert_bias=False,
    num_dense_layers=1, is_moe_layer=[False, True, False, True], kv_channels=16,
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2, swa_head_dim=16, swa_v_head_dim=16,
    add_swa_attention_sink_bias=True, add_full_attention_sink_bias=False,
    hybrid_layer_pattern=[1, 0, 1, 0], attn_layer_offset=1, attn_layer_period=2,
    expert_layer_offset=1, expert_layer_period=2, no_rope_layers=[1, 1, 1, 1],
    sliding_window_layers=[0, 2], full_attention_interval=2, sliding_window_pattern=2,
    layer_types=["sliding_attention", "full_attention"] * 2,
)  # fmt: skip

# What the generic values cannot express.
_ROPE = {"rope_theta": 10000.0, "rope_type": "default"}
OVERRIDES = {
    "baichuan_m1": dict(conv_window=2),
    "dbrx": dict(
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
        attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
    ),
    "deepseek_v2": dict(rope_scaling=dict(factor=1.0, original_max_position_embeddings=512,
                                          beta_fast=32, beta_slow=1, mscale=1,
                                          mscale_all_dim=0, type="yarn")),
    "exaone4": dict(sliding_window_pattern="LG"),
    "glm_moe_dsa": dict(rope_parameters=_ROPE),
    "hunyuan": dict(rope_scaling=dict(alpha=1.0, factor=1.0, type="dynamic")),
    "kimi_linear": dict(linear_attn_config=dict(num_heads=4, head_dim=16, kda_layers=[1, 3],
                                                full_attn_layers=[2, 4])),
    "lfm2": dict(layer_types=["conv", "full_attention"] * 2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"] * 2),
    "minicpm3": dict(rope_scaling=dict(original_max_position_embeddings=512)),
    "mimo_v2_flash": dict(moe_layer_freq=[0, 1, 0, 1]),
    "minimax_m3_vl": dict(moe_layer_freq=[0, 1, 0, 1]),
    "ministral3": dict(rope_parameters=dict(_ROPE, llama_4_scaling_beta=0.1,
                                            original_max_position_embeddings=512)),
    "mistral4": dict(rope_parameters=dict(_ROPE, llama_4_scaling_beta=0.1,
                                          original_max_position_embeddings=512)),
    "nemotron": dict(hidden_act="relu2"),
    "nemotron-nas": dict(block_configs=[dict(attention=dict(n_heads_in_group=2),
                                             ffn=dict(ffn_mult=1.0))] * 4),
    "nemotron_h": dict(hybrid_override_pattern=list("M*-*")),
    "openelm": dict(num_query_heads=[4] * 4, num_kv_heads=[2] * 4,
                    ffn_multipliers=[1.0] * 4),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "spark2_5": dict(rope_parameters={"full_attention": _ROPE, "sliding_attention": _ROPE}),
    "step3p5": dict(moe_num_experts=4, moe_top_k=2),
    "gemma4_text": dict(num_kv_shared_layers=2),  # layers 2-3 attend over layers 0-1's caches
    "gemma3n": dict(num_kv_shared_layers=2, vocab_size_per_layer_input=128,
                    rope_local_base_freq=10000.0, final_logit_softcapping=30.0,
                    activation_sparsity_pattern=[0.0] * 4, hidden_size_per_layer_input=8,
                    altup_num_inputs=2, altup_coef_clip=120.0, altup_correct_scale=True,
                    altup_active_idx=0, laurel_rank=8),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"] * 2, mamba_n_heads=4,
                             mamba_d_head=16, mamba_proj_bias=False, mamba_d_state=8,
                             mamba_d_conv=4, mamba_n_groups=1, mamba_conv_bias=True),
    "llama4": dict(attention_chunk_size=8, interleave_moe_layer_step=2),
    "mellum": dict(rope_parameters={"full_attention": _ROPE, "sliding_attention": _ROPE}),
    "muse_spark": dict(post_norm_eps=1e-5, rope_parameters=_ROPE,
                       layer_rope_theta=[10000.0, 0.0] * 2, final_logit_softcapping=30.0,
                       output_multiplier=1.0, moe_hidden_size=32),
}
OVERRIDES["gemma4"] = OVERRIDES["gemma4_text"]
OVERRIDES["llama4"] = dict(OVERRIDES["llama4"], num_experts_per_tok=1)
OVERRIDES["muse_spark"] = dict(OVERRIDES["muse_spark"], num_shared_experts=0)
OVERRIDES["kimi_linear"]["linear_attn_config"]["short_conv_kernel_size"] = 4
OVERRIDES["kimi_k3"] = dict(OVERRIDES["kimi_linear"], num_experts_per_token=2)
OVERRIDES["plamo"] = dict(n_shared_head=2)

# Types whose random instance crashes the process inside mlx on this CPU with plain
# caches: only the cache plan is checked (it must refuse them, with a reason).
NO_FORWARD = {
    "phi3small": "its forward pass segfaults inside mlx 0.32.4 (CPU) with plain caches",
}

# Types a random instance cannot stand for, and why.
NOT_BUILT = {
    "prism_hadamard_qwen35": "loads only a packed-weight manifest (2-bit Hadamard packs); its "
    "attention and caches are qwen3_5's, tested above",
}
for _t in ("lfm2-vl",):
    OVERRIDES[_t] = OVERRIDES["lfm2"]

TEXT_CONFIG_OF = {}  # model type -> the model type its text_config builds

PROMPT_TOKENS = 11
DECODE_STEPS = 3


def model_types():
    import mlx_lm.models as models

    names = [m.name for m in pkgutil.iter_modules(models.__path__)]
    return sorted(n for n in names if n not in HELPERS)


def config_for(model_type):
    config = dict(SMALL, model_type=model_type)
    config.update(OVERRIDES.get(model_type, {}))
    config["text_config"] = dict(config, model_type=TEXT_CONFIG_OF.get(model_type, model_type))
    return config


class NotRunnable(Exception):
    """The model cannot run here with or without a scheme (a missing optional package,
    a Metal-only kernel): a fact about this machine, not about the plugin."""


def build(model_type):
    if model_type in NOT_BUILT:
        raise NotRunnable(NOT_BUILT[model_type])
    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except (ImportError, SystemExit) as e:  # olmo calls sys.exit() without ai2-olmo
        raise NotRunnable(f"mlx_lm.models.{model_type} does not import here ({e!r})") from None
    args = module.ModelArgs.from_dict(config_for(model_type))
    mx.random.seed(0)
    model = module.Model(args)
    mx.eval(model.parameters())
    return model


def generate(model, cache, steer=None):
    """Prompt, then greedy decode steps; all logits ``[1, steps + 1, V]``. With ``steer``
    (an earlier result) the same tokens are fed, so two runs can be compared."""
    tokens = mx.array([[(7 * i + 3) % 100 + 1 for i in range(PROMPT_TOKENS)]])
    out = [model(tokens, cache=cache)[:, -1:]]
    for i in range(DECODE_STEPS):
        choose = out[-1] if steer is None else steer[:, i : i + 1]
        out.append(model(mx.argmax(choose, axis=-1), cache=cache)[:, -1:])
    logits = mx.concatenate(out, axis=1)
    mx.eval(logits)
    return logits


def run(model_type):
    """``(compressed layers, kept layers by reason, unsupported reason)``; raises on a crash."""
    from mlx_lm_turboquant.api import base_make_prompt_cache, compress_cache
    from mlx_lm_turboquant.cache import TurboQuantKVCache

    model = build(model_type)
    cache = base_make_prompt_cache(model)
    plan = compress_cache(model, cache, "turbo4")
    if model_type in NO_FORWARD:
        if plan.compressed:
            raise AssertionError(f"{model_type} cannot be checked here and must not be compressed")
        return plan
    try:
        logits = generate(model, cache)
    except Exception:
        try:
            generate(model, base_make_prompt_cache(model))
        except Exception as plain:
            raise NotRunnable(f"fails without a KV scheme too ({type(plain).__name__}: "
                              f"{str(plain).splitlines()[0][:80]})") from None  # fmt: skip
        raise
    if not mx.all(mx.isfinite(logits)).item():
        if not mx.all(mx.isfinite(generate(model, base_make_prompt_cache(model)))).item():
            raise NotRunnable("its random instance gives non-finite logits without a KV scheme too")
        raise AssertionError(f"{model_type}: logits are not finite")
    if plan.compressed:  # same tokens through plain caches: attention must agree roughly
        plain = generate(model, base_make_prompt_cache(model), steer=logits)
        diff, norm = mx.linalg.norm(logits - plain).item(), mx.linalg.norm(plain).item()
        plan.logits_error = diff / norm if norm else float(diff != 0) * 2  # talkie: all zero
    total = PROMPT_TOKENS + DECODE_STEPS
    for i in plan.compressed:
        c = cache[i]
        assert isinstance(c, TurboQuantKVCache)
        if c.offset != total:
            raise AssertionError(
                f"{model_type}: compressed layer {i} holds {c.offset} of {total} tokens"
            )
    return plan


@pytest.fixture(scope="module")
def patched_module():
    import mlx_lm_turboquant

    mlx_lm_turboquant.activate()


@pytest.mark.parametrize("model_type", model_types())
def test_model_type_compresses_or_says_why(model_type, patched_module):
    try:
        plan = run(model_type)
    except NotRunnable as e:
        pytest.skip(str(e))
    if plan.compressed:
        # Random weights, 4-bit K and V: the logits move (0.01 to 0.45 of their norm
        # measured), but stay tied to the plain model's.
        assert plan.logits_error < 1.0
        return
    assert plan.kept, f"{model_type}: nothing compressed and no reason given"
    if plan.unsupported is None:  # every layer is of a kind we leave alone
        assert all(reason != "layer spec" for reason in plan.kept)


BATCH_PROMPTS = ([5, 9, 13, 17, 21, 25, 29], [40, 2, 77])


def batch_tokens(model, kv_scheme, max_tokens=3):
    """Greedy tokens of ``BATCH_PROMPTS`` generated together by mlx-lm's BatchGenerator."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=max_tokens, kv_scheme=kv_scheme)
    try:
        uids = gen.insert([list(p) for p in BATCH_PROMPTS])
        out, seen = {u: [] for u in uids}, set()
        while responses := gen.next_generated():
            seen |= {type(c).__name__ for c in gen._generation_batch.prompt_cache}
            for r in responses:
                out[r.uid].append(r.token)
        return [out[u] for u in uids], seen
    finally:
        gen.close()


def alone_tokens(model, prompt, kv_scheme, max_tokens=3):
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens, kv_scheme=kv_scheme)
    return [t if isinstance(t, int) else t.item() for t, _ in steps]


def run_batch(model_type):
    """Batch generation with turbo4: ``(batched tokens, each prompt alone, cache classes)``."""
    model = build(model_type)
    try:
        batch_tokens(model, "none", max_tokens=1)
    except Exception as e:
        raise NotRunnable(f"mlx-lm cannot batch it without a scheme ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:80]})") from None  # fmt: skip
    batched, seen = batch_tokens(model, "turbo4")
    alone = [alone_tokens(model, p, "turbo4") for p in BATCH_PROMPTS]
    return model, batched, alone, seen


def compressed_types():
    """Model types whose default cache has compressed layers (from mlx-lm's own cache
    lists; nothing is built)."""
    return [t for t in model_types() if t not in UNCOMPRESSED]


# Types left uncompressed (MLA latents, own attention, only state-space / CacheList
# layers) or not built here: the first test covers them.
UNCOMPRESSED = set(
    "baichuan_m1 bailing_hybrid bailing_moe_v3 bitnet deepseek_v3 deepseek_v32 deepseek_v41 "
    "falcon_h1 gemma2 glm4_moe_lite glm_moe_dsa kimi_k25 kimi_k3 kimi_linear kimi_vl "
    "longcat_flash longcat_flash_ngram mamba mamba2 minimax_m3_vl mistral4 muse_spark olmo "
    "phi3small plamo plamo2 prism_hadamard_qwen35 rwkv7".split()
)


@pytest.mark.parametrize("model_type", compressed_types())
def test_model_type_batches_like_one_at_a_time(model_type, patched_module, monkeypatch):
    """mlx-lm's BatchGenerator with turbo4 (two prompts, one left-padded): compressed
    batch caches, and the greedy tokens of each prompt alone."""
    # Exact equality holds on the pure-MLX path. Fused kernels split a padded row's tokens
    # differently from the row alone, and a 1e-6 difference can flip a quantization code
    # of a later token and then a near-tie (seen on the H100: a 0.04-nat gap at step 6);
    # the padded-batch kernel itself is checked to 1e-5 per call in test_batch_cache.py.
    monkeypatch.setenv("MLX_TQ_KERNELS", "reference")
    try:
        model, batched, alone, seen = run_batch(model_type)
    except NotRunnable as e:
        pytest.skip(str(e))
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    from mlx_lm_turboquant.api import base_make_prompt_cache

    kinds = {type(c) for c in base_make_prompt_cache(model)}
    # Sliding-window layers batch compressed too (the prompts outgrow the 8-token window).
    if RotatingKVCache in kinds:
        assert "BatchRotatingTurboQuantKVCache" in seen
    if KVCache in kinds:
        assert "BatchTurboQuantKVCache" in seen
    if batched != alone:
        plain = batch_tokens(model, "none")[0]
        if plain != [alone_tokens(model, p, "none") for p in BATCH_PROMPTS]:
            pytest.xfail(f"mlx-lm batches {model_type} differently from one sequence at a time "
                         "without a scheme too (its state-space layers see the left padding)")
    assert batched == alone


def table():
    import mlx_lm_turboquant

    mlx_lm_turboquant.activate()
    rows = []
    for t in model_types():
        try:
            plan = run(t)
        except NotRunnable as e:
            rows.append((t, "not built here", str(e)))
            continue
        except Exception as e:  # the table shows it; the test fails on it
            rows.append((t, "CRASH", f"{type(e).__name__}: {e}".splitlines()[0][:120]))
            continue
        n = plan.n_layers
        kept = "; ".join(f"{r}: {len(v)}" for r, v in plan.kept.items())
        if plan.compressed:
            err = f"{plan.logits_error:.3f}"
            rows.append((t, f"compressed {len(plan.compressed)}/{n}", kept or "-", err))
        else:
            rows.append((t, "not compressed", plan.unsupported or kept))
    return rows


if __name__ == "__main__":
    for row in table():
        print("| " + " | ".join(row) + " |")
        sys.stdout.flush()
