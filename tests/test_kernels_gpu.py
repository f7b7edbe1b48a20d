"""Fused kernels against their pure-MLX twins, on a GPU (skipped elsewhere).

Rule (flash-attention's): against a float32 reference computed from the original
vectors, a kernel's error may be at most 2x that of its pure-MLX twin. Inputs are fresh
random draws on every run (seeded from the clock, printed on failure).
Run on the device with ``python -m pytest -q tests/test_kernels_gpu.py``.
"""

import time

import mlx.core as mx
import pytest

from conftest import heavy_sinks

from mlx_lm_turboquant import TurboQuantKVCache, kernels, turboquant_sdpa
from mlx_lm_turboquant.codec import get_codec
from mlx_lm_turboquant.codec.centring import RopeFrame
from mlx_lm_turboquant.config import builtin_scheme_names, parse_scheme
from mlx_lm_turboquant.kernels import launch
from mlx_lm_turboquant.kernels.reference import reference_sdpa

BACKEND = kernels.active_backend()
pytestmark = pytest.mark.skipif(BACKEND is None, reason="no GPU backend (CUDA or Metal)")

FORMATS = builtin_scheme_names()  # every key/value format a scheme uses
SEED = int(time.time())
T = 777  # several spans and a partial last tile


def _rms(a, ref):
    return float(mx.sqrt(((a.astype(mx.float32) - ref) ** 2).mean()))


def _case(scheme, D, n_rep, L, dtype, seed, n_kv=2, mask=None, sinks=False, scale=1.0,
          q_scale=1.0, frame=None, must_cover=True):  # fmt: skip
    """Fused, twin and exact attention on a fresh cache; with a RoPE ``frame`` (centred
    schemes) the keys are a shared mean plus noise, turned to their positions."""
    mx.random.seed(seed)
    keys = mx.random.normal((1, n_kv, T, D)) * 2.0 * scale
    if frame is not None:
        keys = frame.rotate(keys + mx.random.normal((1, n_kv, 1, D)) * 4.0 * scale, 0)
    keys = keys.astype(dtype)
    values = (mx.random.normal((1, n_kv, T, D)) * scale).astype(dtype)
    queries = (mx.random.normal((1, n_kv * n_rep, L, D)) * q_scale).astype(dtype)
    cache = TurboQuantKVCache(scheme, layer_index=seed % 97, rope_frame=frame)
    cache.update_and_fetch(keys[:, :, : T - L], values[:, :, : T - L])
    cache.update_and_fetch(keys[:, :, T - L :], values[:, :, T - L :])
    scale_qk = D**-0.5
    s = heavy_sinks(queries, keys, scale_qk) if sinks else None
    exact = mx.fast.scaled_dot_product_attention(
        queries.astype(mx.float32), keys.astype(mx.float32), values.astype(mx.float32),
        scale=scale_qk, mask=mask, sinks=s, stream=mx.cpu,
    )  # fmt: skip
    twin = reference_sdpa(queries, cache, scale_qk, mask=mask, sinks=s)
    fused = BACKEND.decode_attention(queries, cache, scale_qk, mask=mask, sinks=s)
    assert fused is not None or not must_cover, "the fused kernel declined a shape it must cover"
    mx.eval(exact, twin, *([] if fused is None else [fused]))
    return fused, twin, exact


@pytest.mark.parametrize("L", [1, 4])
@pytest.mark.parametrize("n_rep", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("scheme", FORMATS)
def test_attention_parity(scheme, D, n_rep, L):
    seed = SEED + hash((scheme, D, n_rep, L)) % 100_000
    dtype = mx.bfloat16 if (D + n_rep + L) % 2 else mx.float16
    mask = "causal" if L > 1 else None
    fused, twin, exact = _case(scheme, D, n_rep, L, dtype, seed, mask=mask)
    assert fused.shape == twin.shape and fused.dtype == twin.dtype
    assert not mx.isnan(fused).any()
    e_fused, e_twin = _rms(fused, exact), _rms(twin, exact)
    assert e_fused <= 2 * e_twin + 1e-6, (seed, e_fused, e_twin)


def _frame(D, kind):
    """RoPE over every channel (``full``), adjacent pairs (``traditional``) or half the
    channels (``partial``), Llama 3's base."""
    dims = D // 2 if kind == "partial" else D
    return RopeFrame.standard(dims, 500000.0, traditional=kind == "traditional")


CENTRED = ["turbo4c", "turbo3c", "turbo2c", "turbo4v2c", "turbo8v4c"]


@pytest.mark.parametrize("L", [1, 4])
@pytest.mark.parametrize("n_rep", [1, 4, 8])
@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("scheme", CENTRED)
def test_centred_attention_parity(scheme, D, n_rep, L):
    """Centred caches (keys stored less their turned mean): the kernels add q . R_t mu.
    The portable kernel keeps each row's Y = conj(q) mu e^{i t w} in shared memory beside
    the query, so with many rows of large heads it declines (the pure-MLX path runs)."""
    seed = SEED + hash((scheme, D, n_rep, L, "c")) % 100_000
    kind = ("full", "traditional", "partial")[(D // 32 + n_rep + L) % 3]
    dtype = mx.bfloat16 if (D + n_rep + L) % 2 else mx.float16
    frame = _frame(D, kind)
    parsed = parse_scheme(scheme)
    covered = launch.attention_plan(
        D, n_rep, L, parsed.key_bits, dtype, parsed.value_bits, BACKEND.SHARED_BYTES, True,
        (frame.dims, frame.traditional)) is not None  # fmt: skip
    fused, twin, exact = _case(scheme, D, n_rep, L, dtype, seed, frame=frame,
                               mask="causal" if L > 1 else None, must_cover=covered)  # fmt: skip
    if not covered:
        assert fused is None
        return
    assert not mx.isnan(fused).any()
    e_fused, e_twin = _rms(fused, exact), _rms(twin, exact)
    assert e_fused <= 2 * e_twin + 1e-6, (seed, kind, e_fused, e_twin)
    # fp16 tables and queries cost ~1% of the quantization error; a wrong phase, pair or
    # mean would cost far more (the mean carries most of these keys).
    assert _rms(fused, twin.astype(mx.float32)) < 0.05 * e_twin, (seed, kind)


@pytest.mark.parametrize("kind", ["full", "traditional", "partial"])
@pytest.mark.parametrize("scheme", ["turbo4c", "turbo3c"])
def test_centred_portable_kernel_where_tensor_cores_apply(monkeypatch, scheme, kind):
    monkeypatch.setenv(launch.TENSOR_CORES_ENV, "0")
    seed = SEED + hash((scheme, kind, "cp")) % 100_000
    fused, twin, exact = _case(scheme, 128, 4, 1, mx.bfloat16, seed, frame=_frame(128, kind))
    assert _rms(fused, exact) <= 2 * _rms(twin, exact) + 1e-6, (seed, kind)
    assert _rms(fused, twin.astype(mx.float32)) < 0.05 * _rms(twin, exact), (seed, kind)


@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("n_rep", [1, 4])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("scheme", ["turbo4", "turbo3", "turbo2", "turbo4v2"])
def test_portable_kernel_where_tensor_cores_apply(monkeypatch, scheme, D, n_rep, L):
    """The portable kernel (Metal's algorithm) keeps its parity on shapes that the CUDA
    tensor-core kernel takes over by default."""
    monkeypatch.setenv(launch.TENSOR_CORES_ENV, "0")
    seed = SEED + hash((scheme, D, n_rep, L, "portable")) % 100_000
    fused, twin, exact = _case(scheme, D, n_rep, L, mx.float16, seed,
                               mask="causal" if L > 1 else None)  # fmt: skip
    assert _rms(fused, exact) <= 2 * _rms(twin, exact) + 1e-6, seed


@pytest.mark.skipif(BACKEND is None or BACKEND.NAME != "cuda", reason="CUDA only")
@pytest.mark.parametrize("scheme, expected", [("turbo4", "attention_tc"), ("turbo3", "attention_tc"),
                                              ("turbo8v4", "attention"), ("turbo0v4", "attention")])
def test_tensor_cores_take_the_shapes_they_cover(scheme, expected):
    cache = TurboQuantKVCache(scheme)
    cache.update_and_fetch(mx.zeros((1, 2, 1, 128)), mx.zeros((1, 2, 1, 128)))  # makes codecs
    op, _ = launch._plan(BACKEND.kernel, BACKEND.SHARED_BYTES, cache.key_codec, cache.value_codec,
                         mx.float16, 4, 1, 128, launch.tensor_cores_enabled(),
                         cache.packed is not None)  # fmt: skip
    assert op == expected


@pytest.mark.skipif(BACKEND is None or BACKEND.NAME != "cuda", reason="CUDA only")
def test_mlx_reports_the_architecture_that_picks_the_table_rows():
    """cuda.wide_bytes reads the architecture from mx.device_info: it must be there, or an
    H100 would silently get the narrow rows."""
    arch = mx.device_info().get("architecture")
    assert isinstance(arch, str) and arch.startswith("sm_"), mx.device_info()
    assert (BACKEND.wide_bytes() > 0) == (arch.rstrip("a") in BACKEND._WIDE_ARCHS)


@pytest.mark.skipif(BACKEND is None or BACKEND.NAME != "cuda", reason="CUDA only")
@pytest.mark.parametrize("L", [1, 4])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("scheme", ["turbo4", "turbo3", "turbo2v4", "turbo4v3", "turbo4c"])
def test_tensor_core_kernel_with_narrow_table_rows(monkeypatch, scheme, D, L):
    """The narrow rows (128 bytes per entry: GPUs other than sm_90 / sm_100), run here by
    hand: the same parity as the wide ones."""
    monkeypatch.setattr(BACKEND, "wide_bytes", lambda: 0)
    seed = SEED + hash((scheme, D, L, "narrow")) % 100_000
    frame = _frame(D, "full") if scheme.endswith("c") else None
    fused, twin, exact = _case(scheme, D, 4, L, mx.bfloat16, seed, frame=frame,
                               mask="causal" if L > 1 else None)  # fmt: skip
    e_twin = _rms(twin, exact)
    assert _rms(fused, exact) <= 2 * e_twin + 1e-6, seed
    assert _rms(fused, twin.astype(mx.float32)) < 0.05 * e_twin, seed


@pytest.mark.skipif(BACKEND is None or BACKEND.NAME != "cuda", reason="CUDA only")
@pytest.mark.parametrize("scheme", ["turbo4", "turbo3", "turbo2"])
def test_bulk_copies_of_a_buffer_of_any_capacity(monkeypatch, scheme):
    """On sm_90 the rows come by bulk copies where their address and size are multiples of
    16 bytes and by the lanes' loads elsewhere (views of odd capacities here): the same
    result as the loads of the narrow build. Bulk copies for rows of any size here."""
    monkeypatch.setattr(launch, "BULK_MIN_BYTES", 0)
    mx.random.seed(SEED)
    keys, values = (mx.random.normal((1, 3, T, 128)).astype(mx.bfloat16) for _ in "kv")
    q = mx.random.normal((1, 12, 1, 128)).astype(mx.bfloat16)
    cache = TurboQuantKVCache(scheme)
    cache.update_and_fetch(keys, values)
    for capacity in (T, T + 1, T + 2, T + 3, cache.packed.shape[2]):
        view = TurboQuantKVCache(scheme)
        view.update_and_fetch(keys[:, :, :1], values[:, :, :1])  # codecs, then the rows
        view.packed, view.offset = cache.packed[:, :, :capacity], T
        bulk = BACKEND.decode_attention(q, view, 128**-0.5)
        with monkeypatch.context() as m:
            m.setattr(BACKEND, "wide_bytes", lambda: 0)
            loaded = BACKEND.decode_attention(q, view, 128**-0.5)
        diff = float(mx.abs(bulk.astype(mx.float32) - loaded.astype(mx.float32)).max())
        assert diff < 1e-2, (capacity, diff)


@pytest.mark.parametrize("scheme", ["turbo4", "turbo3", "turbo2v4", "turbo0v4", "turbo8v2"])
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("sinks", [False, True])
def test_attention_masks_and_sinks(scheme, mask_kind, sinks):
    seed = SEED + hash((scheme, mask_kind, sinks)) % 100_000
    mx.random.seed(seed)
    L, n_rep, D = 4, 4, 128
    if scheme in ("turbo4", "turbo3"):  # 8 rows: the tensor-core kernel on CUDA
        L, n_rep = 2, 4
    if mask_kind == "bool":
        mask = mx.random.uniform(shape=(L, T)) < 0.7
        mask[:, -1] = True
    else:
        mask = mx.random.normal((1, 2 * n_rep, L, T))
    fused, twin, exact = _case(scheme, D, n_rep, L, mx.bfloat16, seed, mask=mask, sinks=sinks)
    assert _rms(fused, exact) <= 2 * _rms(twin, exact) + 1e-6, seed


@pytest.mark.parametrize("L", [1, 4])  # 4 rows (tensor cores on CUDA) and 16
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("scheme", ["turbo4", "turbo2", "turbo0v4", "turbo8v3", "turbo4c"])
def test_no_nan_with_large_norms(scheme, dtype, L):
    # fp16 keys near its range; bf16 far beyond fp16's (stored norms are clamped to 65504).
    scale = 2000.0 if dtype == mx.float16 else 1e6
    frame = _frame(128, "full") if scheme.endswith("c") else None
    fused, twin, _ = _case(scheme, 128, 4, L, dtype, SEED, mask="causal", scale=scale,
                           frame=frame)  # fmt: skip
    assert not mx.isnan(fused).any() and not mx.isnan(twin).any()


@pytest.mark.parametrize("scheme", ["turbo4", "turbo3", "turbo4c"])
def test_large_queries(scheme):
    # the tensor cores take the query as fp16: it goes in divided by its largest element
    # (and a centred cache's conj(q) mu by its largest)
    seed = SEED + 17
    frame = _frame(128, "full") if scheme.endswith("c") else None
    fused, twin, exact = _case(scheme, 128, 4, 1, mx.bfloat16, seed, q_scale=3e4, frame=frame)
    assert not mx.isnan(fused).any()
    assert _rms(fused, exact) <= 2 * _rms(twin, exact) + 1e-6, seed


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("D", [64, 96, 128, 256])
def test_encode_parity(D, bits):
    seed = SEED + D * 10 + bits
    codec = get_codec(D, bits, seed % 1000)
    mx.random.seed(seed)
    x = (mx.random.normal((3, 4, 37, D)) * 3.0).astype(mx.bfloat16)
    fused = BACKEND.encode(codec, x)
    assert fused is not None
    pure = codec.encode(x)
    x32 = x.astype(mx.float32)
    e_fused = _rms(codec.decode(*fused), x32)
    e_pure = _rms(codec.decode(*pure), x32)
    assert e_fused <= 2 * e_pure + 1e-6, (seed, e_fused, e_pure)
    # Same codes except where rounding moves a coordinate across a boundary.
    assert float((codec.codes(fused[0]) == codec.codes(pure[0])).mean()) > 0.99


@pytest.mark.parametrize("kv_bits", [(4, 4), (3, 3), (2, 2), (8, 4), (4, 2), (2, 4)])
@pytest.mark.parametrize("D", [64, 96, 128, 256])
def test_encode_kv_parity(D, kv_bits):
    seed = SEED + D + kv_bits[0] * 7 + kv_bits[1]
    kc, vc = get_codec(D, kv_bits[0], seed % 991), get_codec(D, kv_bits[1], seed % 997 + 1)
    mx.random.seed(seed)
    k = (mx.random.normal((2, 8, 5, D)) * 4.0).astype(mx.float16)
    v = mx.random.normal((2, 8, 5, D)).astype(mx.float16)
    pk, nk, pv, nv = BACKEND.encode_kv(kc, k, vc, v)
    for codec, x, fused in ((kc, k, (pk, nk)), (vc, v, (pv, nv))):
        x32 = x.astype(mx.float32)
        e_fused, e_pure = _rms(codec.decode(*fused), x32), _rms(codec.decode(*codec.encode(x)), x32)
        assert e_fused <= 2 * e_pure + 1e-6, (seed, e_fused, e_pure)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_encode_no_nan_with_large_norms(dtype):
    codec = get_codec(128, 4, 3)
    x = mx.random.normal((64, 128)) * (3000.0 if dtype == mx.float16 else 1e30)
    packed, norms = BACKEND.encode(codec, x.astype(dtype))
    assert not mx.isnan(norms).any() and not mx.isinf(norms).any()


def test_dispatch_uses_the_fused_kernels():
    kernels.reset()
    q, cache = mx.random.normal((1, 8, 1, 128)), TurboQuantKVCache("turbo4")
    cache.update_and_fetch(mx.random.normal((1, 2, 300, 128)), mx.random.normal((1, 2, 300, 128)))
    assert kernels.run("decode_attention", q, cache, 0.1) is not None
    assert kernels.run("encode", cache.value_codec, mx.random.normal((2, 128))) is not None


def test_decode_steps_and_compiled_attention_track_the_cache():
    """Decode steps across a growth of the buffers: the steps (their encode replayed from a
    compiled graph) write what one plain encode of all tokens writes, and the compiled
    attention (with the token count kept on the device) equals the plain launches."""
    from mlx_lm_turboquant.kernels import launch

    mx.random.seed(SEED)
    k = mx.random.normal((1, 2, 262, 128)).astype(mx.bfloat16)
    v = mx.random.normal((1, 2, 262, 128)).astype(mx.bfloat16)
    q = mx.random.normal((1, 8, 1, 128)).astype(mx.bfloat16)
    cache = TurboQuantKVCache("turbo4", layer_index=3)
    cache.update_and_fetch(k[:, :, :250], v[:, :, :250])
    for t in range(250, 262):  # the buffers grow at 256
        cache.update_and_fetch(k[:, :, t : t + 1], v[:, :, t : t + 1])
        fused = BACKEND.decode_attention(q, cache, 128**-0.5)
        plain = launch.decode_attention(BACKEND.kernel, BACKEND.SHARED_BYTES, q, cache, 128**-0.5)
        assert mx.array_equal(fused, plain), f"seed {SEED}, step {t}"
    whole = TurboQuantKVCache("turbo4", layer_index=3)
    whole.update_and_fetch(k, v)
    for got, want in zip(cache.fetch(), whole.fetch()):
        assert mx.array_equal(got, want), f"seed {SEED}"


@pytest.mark.parametrize("scheme", ["turbo4", "turbo3", "turbo4v2", "turbo8v4"])
def test_rows_written_in_place_reach_every_later_launch(scheme):
    """Decode steps built lazily as mlx-lm's loop builds them (nothing evaluated between
    steps, each layer's output feeding the next one's keys): the encodes that write their
    rows in place order every later attention after them, so the result is bit for bit
    that of slice updates. 250 tokens first: the buffers grow during the steps. The steps
    go through the dispatcher, so from the second one on they replay each cache's recorded
    set-ups (kernels.Lane); the slice-update twin takes the full path every step."""
    mx.random.seed(SEED)
    D, n_layers = 128, 4
    k = mx.random.normal((1, 2, 250, D)).astype(mx.bfloat16) * 2
    v = mx.random.normal((1, 2, 250, D)).astype(mx.bfloat16)
    q = mx.random.normal((1, 8, 1, D)).astype(mx.bfloat16)

    def decode(in_place):
        caches = [TurboQuantKVCache(scheme, layer_index=i) for i in range(n_layers)]
        for c in caches:
            c.update_and_fetch(k, v)
        x, wrote = q, 0
        for _ in range(24):
            for c in caches:
                if not in_place:  # a slice update, and no lane
                    c._exposed, c._lane = True, None
                c.update_and_fetch(x[:, :2], x[:, 2:4] * 0.5)
                wrote += c._pending is not None
                x = turboquant_sdpa(x, c, D**-0.5)
        lanes = sum(c._lane is not None and c._lane.attention is not None for c in caches)
        return x, [c.packed for c in caches], wrote, lanes

    x, rows, wrote, lanes = decode(True)
    x_ref, rows_ref, wrote_ref, _ = decode(False)
    assert wrote_ref == 0 and wrote >= 20 * n_layers and lanes == n_layers, (wrote, SEED)
    assert mx.array_equal(x, x_ref), f"seed {SEED}"
    assert all(mx.array_equal(a, b) for a, b in zip(rows, rows_ref)), f"seed {SEED}"


@pytest.mark.parametrize("tensor_cores", [True, False])
@pytest.mark.parametrize("scheme", ["turbo4", "turbo3", "turbo2v4", "turbo8v4"])
def test_token_rows_and_four_arrays_agree(scheme, tensor_cores):
    """Plain caches keep one row per token; batch caches' views keep four arrays. Both
    layouts must give the same attention bit for bit, and the fused encode of rows the
    same codes as the fused encode of four arrays."""
    import copy

    from mlx_lm_turboquant.codec.packing import token_rows

    mx.random.seed(SEED)
    k = mx.random.normal((1, 2, 300, 128)).astype(mx.bfloat16) * 3
    v = mx.random.normal((1, 2, 300, 128)).astype(mx.bfloat16)
    q = mx.random.normal((1, 8, 2, 128)).astype(mx.bfloat16)
    cache = TurboQuantKVCache(scheme, layer_index=5)
    cache.update_and_fetch(k[:, :, :299], v[:, :, :299])
    cache.update_and_fetch(k[:, :, 299:], v[:, :, 299:])
    assert cache.packed is not None
    apart = copy.deepcopy(cache)
    apart._unpack()
    run = lambda c: launch.decode_attention(BACKEND.kernel, BACKEND.SHARED_BYTES, q, c,  # noqa
                                            128**-0.5, mask="causal", tensor_cores=tensor_cores)
    rows_out, apart_out = run(cache), run(apart)
    assert rows_out is not None and mx.array_equal(rows_out, apart_out), SEED
    kc, vc = cache.key_codec, cache.value_codec
    assert mx.array_equal(BACKEND.encode_rows(kc, k, vc, v),
                          token_rows(*BACKEND.encode_kv(kc, k, vc, v))), SEED  # fmt: skip


def test_sliding_window_cache_takes_the_fused_kernel():
    from mlx_lm_turboquant import RotatingTurboQuantKVCache

    mx.random.seed(SEED)
    k = mx.random.normal((1, 2, 300, 128)).astype(mx.bfloat16)
    v = mx.random.normal((1, 2, 300, 128)).astype(mx.bfloat16)
    q = mx.random.normal((1, 8, 1, 128)).astype(mx.bfloat16)
    cache = RotatingTurboQuantKVCache("turbo4", max_size=256)
    cache.update_and_fetch(k[:, :, :290], v[:, :, :290])
    for t in range(290, 300):  # decode steps wrap around the window
        cache.update_and_fetch(k[:, :, t : t + 1], v[:, :, t : t + 1])
    fused = BACKEND.decode_attention(q, cache, 128**-0.5)
    twin = reference_sdpa(q, cache, 128**-0.5)
    assert fused is not None, "the window's decode must take the fused kernel"
    assert _rms(fused, twin.astype(mx.float32)) <= 1e-2 * _rms(twin, mx.zeros_like(twin)), SEED
