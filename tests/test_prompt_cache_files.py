"""Prompt-cache files: scheme metadata, exact round trips, and hostile files.

Every corrupt or hostile file must fail in ``load_prompt_cache`` with a ValueError
that names the problem, never later inside attention and never with a crash.
"""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models import llama

import mlx_lm_turboquant as tq
from mlx_lm_turboquant.integration import state

N_LAYERS = 3


def tiny_llama():
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=N_LAYERS, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
        vocab_size=97,
    )  # fmt: skip
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(autouse=True)
def no_scheme_from_outside(monkeypatch):
    for var in ("MLX_TQ_SCHEME", "MLX_TQ_LAYERS", "MLX_TQ_QUIET"):
        monkeypatch.delenv(var, raising=False)
    state.set_cli(None)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def filled_cache(model, scheme="turbo4", layers="1:"):
    cache = tq.make_prompt_cache(model, scheme, layers=layers)
    model(mx.array([[3, 1, 4, 1, 5, 9, 2, 6]]), cache=cache)
    return cache


@pytest.fixture
def good_file(patched, model, tmp_path):
    f = str(tmp_path / "good.safetensors")
    mlx_cache.save_prompt_cache(f, filled_cache(model), {"model": "tiny"})
    return f


def rewrite(src, dst, edit):
    """Load ``src`` raw, let ``edit(arrays, metadata)`` change it, save as ``dst``."""
    arrays, metadata = mx.load(src, return_metadata=True)
    edit(arrays, metadata)
    mx.save_safetensors(dst, arrays, metadata)
    return dst


def scalar_keys(metadata):
    """{(layer, field index): array key} of the scalars save_prompt_cache stored."""
    meta = tree_unflatten(list(metadata.items()))
    return {tuple(map(int, key.split("."))): key for key, _ in meta[2][1:]}


def test_round_trip_is_exact_and_records_the_scheme(good_file, model):
    cache, meta = mlx_cache.load_prompt_cache(good_file, return_metadata=True)
    assert meta["kv_scheme"] == "turbo4" and json.loads(meta["kv_layers"]) == [1, 2]
    assert [type(c).__name__ for c in cache] == [
        "KVCache",
        "TurboQuantKVCache",
        "TurboQuantKVCache",
    ]
    original = filled_cache(model)
    for a, b in zip(original[1:], cache[1:]):
        assert (a.offset, a.scheme, a.layer_index) == (b.offset, b.scheme, b.layer_index)
        for x, y in zip(a.dequantize(), b.dequantize()):
            assert mx.array_equal(x, y)
    # The loaded cache keeps generating exactly like the original.
    step = mx.array([[7]])
    assert mx.array_equal(model(step, cache=original), model(step, cache=cache))


def test_loading_reports_the_scheme(good_file, capsys):
    mlx_cache.load_prompt_cache(good_file)
    assert "turbo4 cache loaded from" in capsys.readouterr().err


def test_scheme_mismatch_with_the_active_selection(good_file):
    with state.using(state.select("turbo3", source="--kv-scheme")):
        with pytest.raises(
            ValueError, match="written with kv_scheme turbo4 but --kv-scheme asks for turbo3"
        ):
            mlx_cache.load_prompt_cache(good_file)
    with state.using(state.select("turbo4", source="--kv-scheme")):
        mlx_cache.load_prompt_cache(good_file)
    with state.using(state.select("none", source="--kv-scheme")):
        with pytest.raises(ValueError, match="asks for none"):
            mlx_cache.load_prompt_cache(good_file)


def test_plain_file_with_a_scheme_asked(patched, model, tmp_path):
    f = str(tmp_path / "plain.safetensors")
    cache = mlx_cache.make_prompt_cache(model)
    model(mx.array([[1, 2, 3]]), cache=cache)
    mlx_cache.save_prompt_cache(f, cache)
    assert "kv_scheme" not in mlx_cache.load_prompt_cache(f, return_metadata=True)[1]
    with state.using(state.select("turbo4", source="MLX_TQ_SCHEME")):
        with pytest.raises(ValueError, match="written without a KV scheme, but MLX_TQ_SCHEME"):
            mlx_cache.load_prompt_cache(f)


def _set_array(layer, field, fn):
    def edit(arrays, metadata):
        key = f"{layer}.{field}"
        arrays[key] = fn(arrays[key])

    return edit


def _set_scalar(layer, field, value):
    def edit(arrays, metadata):
        key = scalar_keys(metadata)[(layer, field)]
        if isinstance(value, str):
            arrays[key] = mx.array([ord(c) for c in value])
        else:
            arrays[key] = mx.array(value)

    return edit


def _set_meta(key, value):
    def edit(arrays, metadata):
        metadata[key] = value

    return edit


def _drop_array(key):
    def edit(arrays, metadata):
        del arrays[key]

    return edit


# Layer 1 is a TurboQuant layer: fields 0-3 are keys, key_norms, values, value_norms;
# 4 name, 5 key_bits, 6 value_bits, 7 norm_correction, 8 seed, 9 layer_index,
# 10 offset, 11 k_dim, 12 v_dim, 13 dtype.
HOSTILE = {
    "values cut short in time": (
        _set_array(1, 2, lambda a: a[:, :, :4]),
        "offset 8 is beyond the 4 tokens",
    ),
    "key norms cut short in time": (_set_array(1, 1, lambda a: a[:, :, :4]), "key_norms has shape"),
    "keys cut short in words": (_set_array(1, 0, lambda a: a[..., :-1]), "keys has shape"),
    "norms with an extra axis": (_set_array(1, 1, lambda a: a[..., None]), "key_norms has shape"),
    "values as int32": (_set_array(1, 2, lambda a: a.astype(mx.int32)), "dtype mlx.core.int32"),
    "norms as float32": (_set_array(1, 3, lambda a: a.astype(mx.float32)), "value_norms has shape"),
    "values of rank 1": (
        _set_array(1, 2, lambda a: a.reshape(-1)),
        r"values must be a \[B, H_kv, T, words\]",
    ),
    "offset beyond the data": (_set_scalar(1, 10, 100000), "offset 100000 is beyond"),
    "negative offset": (_set_scalar(1, 10, -3), "offset must be a non-negative int"),
    "key bits out of range": (_set_scalar(1, 5, 5), "does not match key_bits=5"),
    "value bits out of range": (_set_scalar(1, 6, 9), "does not match"),
    "huge head dim": (_set_scalar(1, 11, 10**6), r"k_dim must be an int in \[1, 4096\]"),
    "negative seed": (_set_scalar(1, 8, -1), r"seed must be in \[0, 2\*\*63\)"),
    "unknown dtype": (_set_scalar(1, 13, "int8"), "cache dtype must be"),
    "empty scheme name": (_set_scalar(1, 4, ""), "scheme name must be a string"),
    "unknown class name": (
        _set_meta("1.1", "EvilCache"),
        "layer 1 has unknown cache class 'EvilCache'",
    ),
    "a scalar pointing nowhere": (_set_meta("2.1.0", "9.9"), "points at no stored array"),
    "an unknown scalar type": (_set_meta("2.1.1", "pickle"), "unknown scalar type 'pickle'"),
    "a missing array": (_drop_array("1.2"), "invalid prompt cache file"),
    "a plain layer with keys shorter than values": (
        _set_array(0, 0, lambda a: a[:, :, :3]),
        r"layer 0 \(KVCache\) needs float keys and values",
    ),
    "a plain layer with integer values": (
        _set_array(0, 1, lambda a: a.astype(mx.int32)),
        r"layer 0 \(KVCache\) needs float",
    ),
    "metadata naming another scheme": (
        _set_meta("0.kv_scheme", "turbo2"),
        "metadata says kv_scheme='turbo2'",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_a_clear_error(good_file, tmp_path, case):
    edit, message = HOSTILE[case]
    f = rewrite(good_file, str(tmp_path / "bad.safetensors"), edit)
    with pytest.raises(ValueError, match=message):
        mlx_cache.load_prompt_cache(f)


def test_plugin_scheme_names_need_consistent_bits(good_file, tmp_path):
    # A name that is not a built-in form is accepted (a plugin's), with its own bits.
    f = rewrite(good_file, str(tmp_path / "named.safetensors"),
                lambda a, m: (_set_scalar(1, 4, "acme-k4")(a, m), _set_scalar(2, 4, "acme-k4")(a, m),
                              _set_meta("0.kv_scheme", "acme-k4")(a, m)))  # fmt: skip
    cache = mlx_cache.load_prompt_cache(f)
    assert cache[1].scheme.name == "acme-k4" and cache[1].scheme.key_bits == 4


def test_truncated_and_foreign_files(good_file, tmp_path):
    data = open(good_file, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read prompt cache file"):
        mlx_cache.load_prompt_cache(str(cut))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot read prompt cache file"):
        mlx_cache.load_prompt_cache(str(junk))
    foreign = str(tmp_path / "weights.safetensors")
    mx.save_safetensors(foreign, {"w": mx.zeros((2, 2))})
    with pytest.raises(ValueError, match="is not an mlx-lm prompt cache file"):
        mlx_cache.load_prompt_cache(foreign)


def test_every_scalar_field_is_checked(good_file, tmp_path):
    """No field of the state goes unvalidated: each gets a wrong type."""
    meta = mx.load(good_file, return_metadata=True)[1]
    for field in range(4, 15):  # the 11 scalars, variant included
        if (1, field) not in scalar_keys(meta):
            continue
        f = rewrite(good_file, str(tmp_path / f"f{field}.safetensors"), _set_scalar(1, field, 0.5))
        with pytest.raises(ValueError):
            mlx_cache.load_prompt_cache(f)
