"""Kernel dispatch, fallback, and the kernels' arithmetic on the CPU.

The fused kernels cannot run without a GPU, so their bodies run here through a CPU
emulator (``kernel_emulator.py``: one thread per GPU thread, real barriers) driven by the
real launch code; ``test_kernels_gpu.py`` holds the same checks on a GPU.
"""

import copy
import itertools
import shutil
import types
import warnings
from functools import lru_cache, partial

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import heavy_sinks

from mlx_lm_turboquant import TurboQuantKVCache, kernels, turboquant_sdpa
from mlx_lm_turboquant.codec import get_codec
from mlx_lm_turboquant.codec.packing import token_rows
from mlx_lm_turboquant.kernels import cuda, launch, source
from mlx_lm_turboquant.kernels.reference import reference_sdpa

T = 300  # three tiles of 128 tokens, the last one partial


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    kernels.reset()
    yield
    kernels.reset()


def _fake_backend(monkeypatch, **ops):
    module = types.SimpleNamespace(NAME="fake", **ops)
    monkeypatch.setattr(kernels, "active_backend", lambda: module)
    return module


def _cache(scheme, D=64, n_kv=2, seed=0, dtype=mx.float16):
    mx.random.seed(seed)
    keys = (mx.random.normal((1, n_kv, T, D)) * 2.0).astype(dtype)
    values = mx.random.normal((1, n_kv, T, D)).astype(dtype)
    cache = TurboQuantKVCache(scheme, layer_index=seed)
    cache.update_and_fetch(keys, values)
    return cache, keys, values


def test_cpu_uses_the_reference_path():
    assert kernels.active_backend() is None
    assert kernels.get_op("decode_attention") is None
    assert kernels.run("encode", get_codec(64, 4, 0), mx.zeros((2, 64))) is None


def test_env_override(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "reference")
    assert kernels.active_backend() is None
    monkeypatch.setenv(kernels.ENV, "metal")  # not available here: reference path
    kernels.reset()
    assert kernels.active_backend() is None
    monkeypatch.setenv(kernels.ENV, "tpu")
    with pytest.raises(ValueError, match="MLX_TQ_KERNELS"):
        kernels.active_backend()


def test_bad_names():
    with pytest.raises(ValueError, match="unknown kernel op"):
        kernels.get_op("prefill")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.backend_module("rocm")


def test_registry_agrees_across_backends():
    for name in kernels.BACKENDS:
        module = kernels.backend_module(name)
        assert module.NAME == name and module.kernel("attention") is None  # no GPU here
        for op in kernels.OPS:
            assert callable(getattr(module, op)), (name, op)


def test_failing_kernel_falls_back_with_one_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("nvrtc: compilation failed")

    cache, _, _ = _cache("turbo4")
    _fake_backend(monkeypatch, decode_attention=broken, encode=broken, encode_kv=broken)
    q = mx.random.normal((1, 4, 1, 64))
    with pytest.warns(RuntimeWarning, match="decode_attention' kernel failed") as record:
        first = turboquant_sdpa(q, cache, scale=0.125)
        second = turboquant_sdpa(q, cache, scale=0.125)
    assert len([w for w in record if "decode_attention" in str(w.message)]) == 1
    expected = reference_sdpa(q, cache, 0.125)
    assert mx.array_equal(first, expected) and mx.array_equal(second, expected)

    codec = get_codec(64, 3, 1)
    x = mx.random.normal((3, 64))
    with pytest.warns(RuntimeWarning, match="'encode' kernel failed"):
        packed, norms = kernels.encode(codec, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again = kernels.encode(codec, x)
    ref = codec.encode(x)
    assert mx.array_equal(packed, ref[0]) and mx.array_equal(again[1], ref[1])


def _stub_kernels(seen=None):
    """A ``kernel(op)`` lookup whose launches yield zeros of the requested outputs, appending
    ``(op, inputs)`` to ``seen`` if given (one launch object per op, as the backends keep)."""

    @lru_cache(maxsize=None)
    def kernel(op, shared_memory=0):
        def launch_(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            if seen is not None:
                seen.append((op, inputs))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

        return launch_

    return kernel


def test_a_configurations_first_call_is_evaluated_in_the_guard(monkeypatch):
    """mlx builds a kernel lazily, so the first call of each kernel configuration is evaluated
    where a failure can still fall back; later calls of it stay lazy."""
    kernel = _stub_kernels()
    cache, keys, values = _cache("turbo4")
    _fake_backend(monkeypatch, decode_attention=partial(launch.decode_attention, kernel, 48 << 10),
                  encode_kv=partial(launch.encode_kv, kernel))  # fmt: skip
    evaluated, real_eval = [], mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a: evaluated.append(len(a)) or real_eval(*a))
    one, two = mx.random.normal((1, 4, 1, 64)), mx.random.normal((1, 4, 2, 64))
    kc, vc = cache.key_codec, cache.value_codec
    calls = [("decode_attention", one, cache, 0.125), ("decode_attention", one, cache, 0.125),
             ("decode_attention", two, cache, 0.125), ("encode_kv", kc, keys, vc, values),
             ("encode_kv", kc, keys, vc, values), ("decode_attention", one, cache, 0.125)]
    counts = []
    for op, *args in calls:
        assert kernels.run(op, *args) is not None
        counts.append(len(evaluated))
    assert counts == [1, 1, 2, 3, 3, 3]
    kernels.reset()  # forgets the set-ups: evaluated again
    kernels.run("decode_attention", one, cache, 0.125)
    assert len(evaluated) == 4


def test_decode_steps_make_no_new_host_arrays(monkeypatch):
    """On CUDA a host array made per call costs a transfer before the launch can read it:
    the attention's small inputs (split sizes, token count, unused slots) are made once per
    capacity and count, and every layer of a step shares them."""
    seen = []
    kernel = _stub_kernels(seen)
    layers = [_cache("turbo4")[0] for _ in range(2)]
    attend = partial(launch.decode_attention, kernel, 48 << 10)
    q = mx.random.normal((1, 4, 1, 64))
    for c in layers:  # capacity and token count as the next steps will see them
        attend(q, c, 0.125)
    small = {}  # attention input slot -> the arrays a step passed there
    for _ in range(2):  # steps
        seen.clear()
        for c in layers:
            attend(q, c, 0.125)
        for slot, name in enumerate(source.ATTENTION_INPUTS):
            if name in ("mask", "pos", "meta"):
                small.setdefault(name, []).extend(
                    inputs[slot] for op, inputs in seen if op != "reduce")
    for name, arrays in small.items():
        assert all(a is arrays[0] for a in arrays), f"a new {name!r} array per call"


def test_uncovered_shapes_take_the_reference_path_silently(monkeypatch):
    cache, _, _ = _cache("turbo3")
    _fake_backend(monkeypatch, decode_attention=lambda *a, **k: None)
    q = mx.random.normal((1, 2, 1, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = turboquant_sdpa(q, cache, scale=0.125)
    assert mx.array_equal(out, reference_sdpa(q, cache, 0.125))


def test_plan_limits():
    plan = launch.attention_plan(128, 4, 1, 4, mx.float16, 4, 48 * 1024)
    assert plan is not None and plan.R == 4 and plan.NT == 128 and plan.Q_SH
    assert launch.attention_plan(128, 4, 9, 4, mx.float16, 4, 48 * 1024) is None  # prefill
    assert launch.attention_plan(80, 1, 1, 4, mx.float16, 4, 48 * 1024) is None  # D % 32
    assert launch.attention_plan(128, 1, 1, 0, mx.float32, 4, 48 * 1024) is None  # fp32 keys
    for T_, blocks in ((1, 8), (300, 2), (131072, 8), (5000, 64)):
        span, n = launch.split_tokens(T_, blocks, 128)
        assert span % 128 == 0 and (n - 1) * span < T_ <= n * span
        assert span >= launch.MIN_SPAN and n * blocks <= max(launch.TARGET_BLOCKS, blocks)
    span, n = launch.split_tokens(4096, 8, 128)  # short: a few spans of MIN_SPAN tokens
    assert span == launch.MIN_SPAN and n * span == 4096
    span, n = launch.split_tokens(131072, 8, 128)  # long: about TARGET_BLOCKS blocks
    assert launch.TARGET_BLOCKS // 2 < n * 8 <= launch.TARGET_BLOCKS


# -- the kernel bodies, emulated on the CPU --------------------------------------------

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the emulator")


def _emulate(monkeypatch):
    """Route the dispatcher to the emulated kernels (after building any cache: emulating
    a long prefill's encode would be slow)."""
    import kernel_emulator as emu

    module = types.SimpleNamespace(
        NAME="emulator",
        decode_attention=partial(launch.decode_attention, emu.kernel, emu.SHARED_BYTES),
        encode=partial(launch.encode, emu.kernel),
        encode_kv=partial(launch.encode_kv, emu.kernel),
        encode_rows=partial(launch.encode_rows, emu.kernel),
        append_rows=partial(launch.append_rows, emu.kernel),
    )
    monkeypatch.setattr(kernels, "active_backend", lambda: module)
    monkeypatch.setattr(launch, "MIN_SPAN", 0)  # short test caches still take several spans
    return module


def _apart(cache):
    """A copy of ``cache`` keeping four arrays instead of token rows (batch caches' views
    keep that layout): the kernels must read the same data from it."""
    other = copy.deepcopy(cache)
    other._unpack()
    return other


def _rms(a, ref):
    return float(mx.sqrt(((a.astype(mx.float32) - ref) ** 2).mean()))


def _mask_sinks_exact(q, keys, values, mask, sinks):
    """A random mask of the named kind ("bool", "additive"; else as given), random sinks if
    asked (``heavy_sinks``), and the float32 attention on the original vectors with them."""
    _, n_q, L, D = q.shape
    if mask == "bool":
        mask = mx.random.uniform(shape=(L, T)) < 0.7
        mask[:, -1] = True
    elif mask == "additive":
        mask = mx.random.normal((1, n_q, L, T))
    s = heavy_sinks(q, keys, D**-0.5) if sinks else None
    exact = mx.fast.scaled_dot_product_attention(
        q.astype(mx.float32), keys.astype(mx.float32), values.astype(mx.float32),
        scale=D**-0.5, mask=mask, sinks=s,
    )  # fmt: skip
    return mask, s, exact


@needs_gxx
@pytest.mark.parametrize(
    "scheme, D, n_rep, L, mask, sinks",
    [
        ("turbo4", 128, 4, 1, None, False),
        ("turbo3", 64, 4, 4, "causal", True),
        ("turbo2v4", 96, 1, 4, "bool", False),
        ("turbo0v4", 64, 8, 1, None, True),
        ("turbo8v2", 64, 1, 4, "additive", False),
        ("turbo4v3", 128, 8, 4, "causal", False),  # 32 rows: the warps split the rows
    ],
)
def test_emulated_attention_parity(monkeypatch, scheme, D, n_rep, L, mask, sinks):
    n_kv = 2
    cache, keys, values = _cache(scheme, D, n_kv, seed=D + L, dtype=mx.bfloat16)
    emulated = _emulate(monkeypatch)
    q = mx.random.normal((1, n_kv * n_rep, L, D)).astype(mx.bfloat16)
    mask, s, exact = _mask_sinks_exact(q, keys, values, mask, sinks)
    fused = emulated.decode_attention(q, cache, D**-0.5, mask=mask, sinks=s)
    assert fused is not None and fused.dtype == q.dtype and not mx.isnan(fused).any()
    twin = reference_sdpa(q, cache, D**-0.5, mask=mask, sinks=s)
    assert _rms(fused, exact) <= 2 * _rms(twin, exact) + 1e-6
    # the dispatcher takes the same kernel
    assert mx.array_equal(turboquant_sdpa(q, cache, scale=D**-0.5, mask=mask, sinks=s), fused)
    # and four separate arrays give the very same result as token rows
    assert (cache.packed is not None) == (scheme != "turbo0v4")
    other = emulated.decode_attention(q, _apart(cache), D**-0.5, mask=mask, sinks=s)
    assert mx.array_equal(other, fused)


# The builds of the tensor-core kernel: on sm_90 and later (cuda.wide_bytes) token rows by
# bulk copies ("bulk", taken by rows of any size here), or loaded with wide table rows
# (256 bytes, "wide", 4-bit codes); on other GPUs loaded with narrow rows ("narrow").
WIDE = cuda.WIDE_SHARED_BYTES


def _build(monkeypatch, build):
    """wide_bytes for ``build``, with launch's bulk-copy settings to match."""
    monkeypatch.setattr(launch, "BULK_COPIES", build == "bulk")
    monkeypatch.setattr(launch, "BULK_MIN_BYTES", 0)
    return 0 if build == "narrow" else WIDE


@needs_gxx
@pytest.mark.parametrize(
    "scheme, D, n_rep, L, mask, sinks, build",
    [
        ("turbo4", 128, 4, 1, None, False, "bulk"),
        ("turbo4", 128, 4, 1, None, False, "wide"),  # a byte of codes is a table address
        ("turbo4", 128, 4, 1, None, False, "narrow"),
        ("turbo3", 128, 2, 4, "causal", True, "bulk"),  # value codes straddle words (48 bits)
        ("turbo3", 128, 2, 4, "causal", True, "narrow"),
        ("turbo2v4", 64, 8, 1, "additive", False, "wide"),  # values' table in the top halves
        ("turbo2v4", 64, 8, 1, "additive", False, "narrow"),  # separate key / value tables
        ("turbo3v2", 64, 1, 4, "bool", True, "bulk"),  # key codes straddle words
        ("turbo4v3", 128, 4, 2, "causal", False, "bulk"),  # 8 rows: every row of the tile
        ("turbo4v3", 128, 4, 2, "causal", False, "wide"),
    ],
)
def test_emulated_tensor_core_attention(monkeypatch, scheme, D, n_rep, L, mask, sinks, build):
    """The tensor-core kernel (mma emulated with the PTX ISA's fragment layout) against the
    float32 attention, its pure-MLX twin and the portable kernel."""
    import kernel_emulator as emu

    monkeypatch.setattr(launch, "TARGET_BLOCKS", 4)  # long spans: each warp takes many steps
    wide = _build(monkeypatch, build)
    n_kv = 2
    cache, keys, values = _cache(scheme, D, n_kv, seed=D + 3 * L, dtype=mx.bfloat16)
    op, plan = launch._plan(emu.kernel, emu.SHARED_BYTES, cache.key_codec, cache.value_codec,
                            cache.keys.dtype, n_rep, L, D, True, True, None, wide,
                            launch._bulk())  # fmt: skip
    assert op == "attention_tc" and cache.packed is not None
    assert (plan.BULK > 0, plan.WIDE) == (build == "bulk", build == "wide")
    q = (mx.random.normal((1, n_kv * n_rep, L, D)) * 3.0).astype(mx.bfloat16)
    mask, s, exact = _mask_sinks_exact(q, keys, values, mask, sinks)
    run = partial(launch.decode_attention, emu.kernel, emu.SHARED_BYTES, q, cache, D**-0.5,
                  mask=mask, sinks=s, wide_bytes=wide)  # fmt: skip
    fused, portable = run(tensor_cores=True), run(tensor_cores=False)
    twin = reference_sdpa(q, cache, D**-0.5, mask=mask, sinks=s)
    assert fused.dtype == q.dtype and not mx.isnan(fused).any()
    e_twin = _rms(twin, exact)
    assert _rms(fused, exact) <= 2 * e_twin + 1e-6
    # fp16 queries and centroids add about 1% of the quantization error; a wrong fragment
    # layout or code pairing would add far more.
    assert _rms(fused, twin.astype(mx.float32)) < 0.05 * e_twin
    assert _rms(portable, twin.astype(mx.float32)) < 0.05 * e_twin
    apart = launch.decode_attention(emu.kernel, emu.SHARED_BYTES, q, _apart(cache), D**-0.5,
                                    mask=mask, sinks=s, tensor_cores=True,
                                    wide_bytes=wide)  # fmt: skip
    assert mx.array_equal(apart, fused)


@needs_gxx
def test_emulated_tensor_core_kernel_needs_its_dynamic_shared_memory(monkeypatch):
    """The launch sizes the kernel's table space (dynamic shared memory) from the plan; a
    launch that gave less would read past it on a GPU, and the emulator says so."""
    import kernel_emulator as emu

    cache, _, _ = _cache("turbo4", 64, 1, dtype=mx.bfloat16)
    q = mx.random.normal((1, 4, 1, 64)).astype(mx.bfloat16)

    def short(op, shared_memory=0):
        return emu.kernel(op, shared_memory // 2)

    for build in ("bulk", "wide", "narrow"):
        wide = _build(monkeypatch, build)
        with pytest.raises(RuntimeError, match="dynamic shared memory"):
            launch.decode_attention(short, emu.SHARED_BYTES, q, cache, 0.125, tensor_cores=True,
                                    wide_bytes=wide)  # fmt: skip


@needs_gxx
def test_emulated_bulk_copies_of_a_buffer_of_any_capacity(monkeypatch):
    """Bulk copies need 16-byte addresses and sizes: a cache's rows (33 words at D = 128)
    meet that for every head where its capacity is a multiple of 4 rows, as the cache keeps
    it; any other capacity (a view of the buffer here) has the lanes copy the rows instead,
    with the same result. The emulator raises on a misaligned copy."""
    import kernel_emulator as emu

    monkeypatch.setattr(launch, "TARGET_BLOCKS", 4)
    monkeypatch.setattr(launch, "MIN_SPAN", 0)
    wide = _build(monkeypatch, "bulk")
    cache, keys, values = _cache("turbo4", 128, 3, dtype=mx.bfloat16)
    assert cache.packed.shape[2] % 256 == 0 and T % 16  # the cache's own capacity
    q = mx.random.normal((1, 12, 1, 128)).astype(mx.bfloat16)
    run = partial(launch.decode_attention, emu.kernel, emu.SHARED_BYTES, q, tensor_cores=True,
                  wide_bytes=wide)  # fmt: skip

    def loaded(c):  # the same arithmetic with the rows loaded (narrow build), bit for bit
        monkeypatch.setattr(launch, "BULK_COPIES", False)
        out = run(c, 128**-0.5, wide_bytes=0)
        monkeypatch.setattr(launch, "BULK_COPIES", True)
        return out

    assert mx.array_equal(run(cache, 128**-0.5), loaded(cache))
    for capacity in (T, T + 1, T + 2, T + 3):  # T + 1..: some heads' rows misaligned
        view = copy.deepcopy(cache)
        view.packed = view.packed[:, :, :capacity]
        assert mx.array_equal(run(view, 128**-0.5), loaded(view)), capacity


@needs_gxx
def test_emulated_tensor_core_rows_of_very_different_size(monkeypatch):
    """Each row enters the tensor cores as q / max|q| of that row (fp16 holds no more): rows
    a million apart in size stay finite and match the pure-MLX twin."""
    import kernel_emulator as emu

    n_kv, n_rep, D = 2, 4, 64
    cache, keys, values = _cache("turbo4", D, n_kv, seed=5, dtype=mx.float32)
    q = mx.random.normal((1, n_kv * n_rep, 1, D))
    q = q * mx.array([1e-3, 1.0, 30.0, 1e3] * n_kv)[None, :, None, None]
    fused = launch.decode_attention(emu.kernel, emu.SHARED_BYTES, q, cache, D**-0.5,
                                    tensor_cores=True)  # fmt: skip
    twin = reference_sdpa(q, cache, D**-0.5)
    _, _, exact = _mask_sinks_exact(q, keys, values, None, False)
    assert not mx.isnan(fused).any()
    assert _rms(fused, exact) <= 2 * _rms(twin, exact) + 1e-6


@needs_gxx
def test_tensor_core_kernel_only_takes_sylvester_rotations(monkeypatch):
    """It rotates from the signs alone: a codec with any other rotation gets the portable
    kernel."""
    import kernel_emulator as emu

    cache, _, _ = _cache("turbo4", 128, dtype=mx.bfloat16)
    kc, vc = cache.key_codec, cache.value_codec

    def op():
        return launch._plan(emu.kernel, emu.SHARED_BYTES, kc, vc, cache.keys.dtype, 4, 1, 128,
                            True, True)[0]  # fmt: skip

    assert op() == "attention_tc"
    for rotation in (vc.rotation, kc.rotation):
        monkeypatch.setattr(rotation, "sylvester", False)
        assert op() == "attention"
        monkeypatch.undo()


@needs_gxx
@pytest.mark.parametrize("tokens", [2400, 4500])  # 38 and 71 spans
def test_emulated_tensor_core_merge_over_many_spans(monkeypatch, tokens):
    """The tensor-core kernel's fused merge: more spans than a warp has lanes (71: three
    passes of them), several batches of partials, blocks finishing in either order (the
    emulator runs odd KV heads' blocks last to first), a counter left at zero for the next
    launch, and the same result as the separate reduce."""
    import kernel_emulator as emu

    monkeypatch.setattr(launch, "TARGET_BLOCKS", 4096)
    monkeypatch.setattr(launch, "MIN_SPAN", 0)  # one 64-token tile per span
    _build(monkeypatch, "bulk")
    mx.random.seed(7)
    D, n_kv, n_rep = 64, 2, 4
    keys = (mx.random.normal((1, n_kv, tokens, D)) * 2.0).astype(mx.bfloat16)
    values = mx.random.normal((1, n_kv, tokens, D)).astype(mx.bfloat16)
    cache = TurboQuantKVCache("turbo4", layer_index=3)
    cache.update_and_fetch(keys, values)
    q = mx.random.normal((1, n_kv * n_rep, 1, D)).astype(mx.bfloat16)
    _, s, exact = _mask_sinks_exact(q, keys, values, None, True)
    run = partial(launch.decode_attention, emu.kernel, emu.SHARED_BYTES, q, cache, D**-0.5,
                  sinks=s, wide_bytes=WIDE)  # fmt: skip
    fused = run(tensor_cores=True)
    _, plan = launch._plan(emu.kernel, emu.SHARED_BYTES, cache.key_codec, cache.value_codec,
                           mx.uint32, n_rep, 1, D, True, True, None, WIDE,
                           launch._bulk())  # fmt: skip
    assert plan.BULK  # as on an H100
    kernel = emu.kernel("attention_tc", plan.shared_request)
    meta = kernel.inputs_after[source.ATTENTION_TC_INPUTS.index("meta")]
    assert meta[2] > 32  # spans
    counter = kernel.inputs_after[source.ATTENTION_TC_INPUTS.index("counter")]
    assert counter.shape[0] >= n_kv and not counter.any()
    # the next launch on this cache takes this one's output as its (unread) `after` input
    assert mx.array_equal(run(tensor_cores=True), fused)
    after = kernel.inputs_after[source.ATTENTION_TC_INPUTS.index("after")]
    assert (after == np.array(fused.view(mx.uint16))).all()
    twin = reference_sdpa(q, cache, D**-0.5, sinks=s)
    e_twin = _rms(twin, exact)
    assert not mx.isnan(fused).any() and _rms(fused, exact) <= 2 * e_twin
    assert _rms(fused, twin.astype(mx.float32)) < 0.05 * e_twin
    assert _rms(run(tensor_cores=False), twin.astype(mx.float32)) < 0.05 * e_twin


@pytest.mark.parametrize("scheme, tensor_cores, fewer", [
    ("turbo3", True, True), ("turbo3", False, False), ("turbo4", True, False),
    ("turbo2", True, False), ("turbo4v3", True, False)])  # fmt: skip
def test_turbo3_tensor_core_launch_takes_fewer_blocks(monkeypatch, scheme, tensor_cores, fewer):
    """turbo3's tensor-core build spreads a long context over FEWER_BLOCKS_SHARE of
    TARGET_BLOCKS (faster on the H100); every other build over TARGET_BLOCKS."""
    import kernel_emulator as emu

    _build(monkeypatch, "bulk")
    taken = {}

    class SpansTaken(Exception):
        pass

    def layout(cap, n_blocks, tile, n_kv_heads, target_blocks, min_span, max_splits):
        taken.update(target=target_blocks, n_blocks=n_blocks)
        raise SpansTaken  # the spans are all this test needs; nothing runs

    monkeypatch.setattr(launch, "_layout", layout)
    cache = TurboQuantKVCache(scheme, layer_index=2)
    cache.update_and_fetch(*(mx.random.normal((1, 8, 300, 128)).astype(mx.bfloat16)
                             for _ in "kv"))  # fmt: skip
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.bfloat16)
    with pytest.raises(SpansTaken):
        launch.decode_attention(emu.kernel, emu.SHARED_BYTES, q, cache, 128**-0.5,
                                tensor_cores=tensor_cores, wide_bytes=WIDE)  # fmt: skip
    want = launch.TARGET_BLOCKS * 2 // 3 if fewer else launch.TARGET_BLOCKS
    assert taken == {"target": want, "n_blocks": 8}
    span, n = launch.split_tokens(131072, 8, 64, taken["target"])
    assert want // 2 < n * 8 <= want  # about that many blocks at 128k tokens


def test_fused_merge_caps_the_spans():
    plans = [launch.tensor_core_plan(D, n_rep, L, kb, vb, same, 48 * 1024)
             for D in (64, 128) for n_rep in (1, 2, 4, 8) for L in (1, 2, 4, 8)
             for kb in (2, 3, 4) for vb in (2, 3, 4) for same in (True, False)]  # fmt: skip
    fewest = min(p.max_splits for p in plans if p is not None)
    # the cap only binds where one (batch, KV head) alone would take more spans than that
    assert -(-launch.TARGET_BLOCKS // 2) <= fewest < launch.TARGET_BLOCKS
    span, n = launch.split_tokens(131072, 1, 64, max_splits=100)
    assert n <= 100 and span * n >= 131072 and span * (n - 1) < 131072
    assert launch.split_tokens(131072, 1, 64, max_splits=10**6) == launch.split_tokens(131072, 1, 64)


@settings(max_examples=300, deadline=None)
@given(T=st.integers(1, 1 << 18), rows=st.integers(1, 64), tile=st.sampled_from([16, 64, 128]),
       target=st.integers(1, 1024), min_span=st.sampled_from([0, 16, 512]))
def test_spans_fill_at_most_the_target_blocks(T, rows, tile, target, min_span):
    """Every row of blocks gets the same spans, never more blocks in all than the target
    (more than one wave holds would run in a second; a single row may exceed it with one
    span), whole tiles, and no span that starts past the tokens."""
    span, n = launch.split_tokens(T, rows, tile, target, min_span)
    assert span % tile == 0 and span >= min_span and (n - 1) * span < T <= n * span
    assert n * rows <= max(target, rows)


def test_spans_of_the_benchmark_shape_fill_three_blocks_per_sm():
    # 8 KV heads on an H100 (132 SMs, 3 blocks each): 49 spans of whole warp steps per head
    for T in (32768, 131072):
        span, n = launch.split_tokens(T, 8, launch.TC_TILE, 396, 512)
        assert n == 49 and span % 16 == 0 and span - 16 < -(-T // 49) <= span


def test_tensor_core_plan_limits():
    shared = 48 * 1024
    plan = launch.tensor_core_plan(128, 4, 1, 4, 4, True, shared)
    assert plan is not None and plan.SAME_TABLE and plan.R == 4 and plan.TILE == 16
    assert launch.tensor_core_plan(128, 4, 1, 4, 2, True, shared).SAME_TABLE is False
    assert launch.tensor_core_plan(128, 4, 4, 4, 4, True, shared) is None  # 16 rows
    assert launch.tensor_core_plan(96, 4, 1, 4, 4, True, shared) is None  # head dim
    assert launch.tensor_core_plan(256, 4, 1, 4, 4, True, shared) is None
    assert launch.tensor_core_plan(128, 4, 1, 8, 4, True, shared) is None  # 8-bit keys
    # two 4-bit tables (different codebooks) do not fit next to each other
    assert launch.tensor_core_plan(128, 4, 1, 4, 4, False, shared) is None
    # in wide rows they share the rows (keys low, values high), within the wide budget
    wide = launch.tensor_core_plan(128, 4, 1, 4, 4, False, shared, wide_bytes=WIDE)
    assert wide.WIDE and not wide.SAME_TABLE and wide.table_words == 256 * 64
    same = launch.tensor_core_plan(128, 4, 1, 4, 4, True, shared, wide_bytes=WIDE)
    assert same.WIDE and same.table_words == 256 * 64 and plan.table_words == 256 * 32
    assert launch.tensor_core_plan(128, 4, 1, 4, 4, True, shared, wide_bytes=64 * 1024) == plan
    assert ("WIDE", True) in same.template(mx.float16, 0.1)  # a kernel instance of its own


def test_bulk_copies_where_a_steps_rows_are_large():
    """On sm_90 the rule measured on the H100: 4-bit codes at D = 128 (2112 bytes a step)
    take bulk copies 2 steps ahead; smaller rows are loaded, 4-bit ones with wide tables;
    without bulk copies (BULK_COPIES off) 4-bit codes get wide tables."""
    def plan(D, kb, vb, bulk=None, rope=None):
        bulk = launch._bulk() if bulk is None else bulk
        return launch.tensor_core_plan(D, 4, 1, kb, vb, True, 48 * 1024, True, rope, WIDE, bulk)

    assert (plan(128, 4, 4).BULK, plan(128, 4, 4).WIDE) == (2, False)
    assert plan(128, 4, 4, rope=(128, False)).BULK == 2  # turbo4c
    assert (plan(128, 3, 3).BULK, plan(128, 3, 3).WIDE) == (0, False)
    assert (plan(128, 2, 2).BULK, plan(128, 2, 2).WIDE) == (0, False)
    assert (plan(64, 4, 4).BULK, plan(64, 4, 4).WIDE) == (0, True)
    assert (plan(128, 4, 2).BULK, plan(128, 4, 2).WIDE) == (0, True)
    assert (plan(128, 4, 4, (0, 0)).BULK, plan(128, 4, 4, (0, 0)).WIDE) == (0, True)
    assert plan(128, 2, 2, (3, 0)).BULK == 3  # rows of any size where asked


def test_shared_memory_requests_let_every_plan_launch(monkeypatch):
    """mlx raises a kernel's shared memory limit only when its dynamic part is above 48000
    bytes: a plan whose static and dynamic parts pass 48 KiB together asks for more (on the
    H100, turbo2 at D = 128 with 8 rows failed to launch before). Bulk-copy plans ask for
    enough that an SM holds no more than BULK_BLOCKS_PER_SM of them."""
    for D, n_rep, L, kb, vb, rope, bulk in itertools.product(
        (64, 128), (1, 4, 8), (1, 2), (2, 3, 4), (2, 3, 4), (None, "full"),
        ((2, 2048), (0, 0), (4, 0), (8, 0)),
    ):
        rope = (D, False) if rope else None
        plan = launch.tensor_core_plan(D, n_rep, L, kb, vb, True, 48 * 1024, True, rope, WIDE,
                                       bulk)  # fmt: skip
        if plan is None:
            continue
        need = 4 * (plan.dynamic_words + plan.static_words)
        assert need <= WIDE and plan.shared_request >= 4 * plan.dynamic_words
        assert plan.shared_request > 48000 or need <= 48 * 1024, plan
        if plan.BULK:
            per_block = plan.shared_request + 4 * plan.static_words + 1024
            assert 4 * per_block > launch.SM_SHARED_BYTES >= 3 * per_block, plan
    plan = launch.tensor_core_plan(128, 8, 1, 2, 2, True, 48 * 1024, True, None, WIDE, (7, 0))
    monkeypatch.setattr(launch, "BULK_BLOCKS_PER_SM", 7)  # a floor under 48000 bytes
    assert plan.BULK == 7 and plan.shared_request == 48016


def test_wide_rows_only_on_the_gpus_measured(monkeypatch):
    monkeypatch.setattr(cuda, "available", lambda: True)
    for info, expect in (({"architecture": "sm_90"}, WIDE), ({"architecture": "sm_90a"}, WIDE),
                         ({"architecture": "sm_86"}, 0), ({"architecture": "sm_100"}, WIDE),
                         ({"compute_capability_major": 9, "compute_capability_minor": 0}, WIDE),
                         ({"device_name": "?"}, 0)):  # fmt: skip
        monkeypatch.setattr(mx, "device_info", lambda: info)
        cuda.wide_bytes.cache_clear()
        assert cuda.wide_bytes() == expect, info
    cuda.wide_bytes.cache_clear()


def test_centred_plans():
    """Centring needs the query in shared memory (the block turns it into Z itself) and, on
    tensor cores, whole k-chunks of RoPE pairs (dims a multiple of 16)."""
    shared = 48 * 1024
    plain = launch.attention_plan(128, 4, 1, 4, mx.float16, 4, shared, True)
    plan = launch.attention_plan(128, 4, 1, 4, mx.float16, 4, shared, True, (128, False))
    assert plan.CENTRED and plan.RDIMS == 128 and not plan.RTRAD and not plain.CENTRED
    assert plan.TILE <= plain.TILE  # the centring tables take shared memory
    assert launch.attention_plan(128, 4, 1, 4, mx.float16, 4, shared, True, (130, False)) is None
    # 64 rows: the query does not fit in shared memory, so centring cannot run there
    assert launch.attention_plan(128, 8, 8, 4, mx.float16, 4, 32 * 1024, True,
                                 (128, False)) is None  # fmt: skip
    tc = launch.tensor_core_plan(128, 4, 1, 4, 4, True, shared, True, (64, True))
    assert tc.CENTRED and tc.RDIMS == 64 and tc.RTRAD
    assert launch.tensor_core_plan(128, 4, 1, 4, 4, True, shared, True, (40, False)) is None
    assert launch.attention_plan(128, 4, 1, 4, mx.float16, 4, shared, True, (40, False)).CENTRED


def _centred_case(scheme, D, n_rep, L, rope, seed):
    """A centred cache whose keys share a large mean before RoPE, queries, and the float32
    attention on the original vectors."""
    from mlx_lm_turboquant.codec.centring import RopeFrame

    dims, traditional = rope
    frame = RopeFrame.standard(dims, 500000.0, traditional)
    n_kv = 2
    mx.random.seed(seed)
    mean = mx.random.normal((1, n_kv, 1, D)) * 4.0
    keys = frame.rotate(mean + mx.random.normal((1, n_kv, T, D)), 0).astype(mx.bfloat16)
    values = mx.random.normal((1, n_kv, T, D)).astype(mx.bfloat16)
    cache = TurboQuantKVCache(scheme, layer_index=seed, rope_frame=frame)
    cache.update_and_fetch(keys[:, :, : T - L], values[:, :, : T - L])
    cache.update_and_fetch(keys[:, :, T - L :], values[:, :, T - L :])
    q = (mx.random.normal((1, n_kv * n_rep, L, D)) * 2.0).astype(mx.bfloat16)
    return cache, q, keys, values


@needs_gxx
@pytest.mark.parametrize(
    "scheme, D, n_rep, L, rope, mask",
    [
        ("turbo4c", 128, 4, 1, (128, False), None),
        ("turbo3c", 64, 2, 4, (64, True), "causal"),  # adjacent pairs, code straddles
        ("turbo4v2c", 128, 2, 1, (64, False), None),  # half the channels turn: c0
        ("turbo2c", 96, 4, 1, (96, True), None),  # portable only (D = 96)
        ("turbo8v4c", 64, 8, 4, (48, False), "causal"),  # 32 rows, 8-bit keys: portable
    ],
)
def test_emulated_centred_attention(monkeypatch, scheme, D, n_rep, L, rope, mask):
    """Both kernels add q . R_t mu to the scores of a centred cache: against the float32
    attention on the original keys, the twin, and each other."""
    import kernel_emulator as emu

    monkeypatch.setattr(launch, "MIN_SPAN", 0)
    monkeypatch.setattr(launch, "TARGET_BLOCKS", 4)  # each warp takes several steps
    cache, q, keys, values = _centred_case(scheme, D, n_rep, L, rope, seed=D + L)
    assert cache.plain and cache.packed is not None
    exact = mx.fast.scaled_dot_product_attention(
        q.astype(mx.float32), keys.astype(mx.float32), values.astype(mx.float32),
        scale=D**-0.5, mask=mask)  # fmt: skip
    twin = reference_sdpa(q, cache, D**-0.5, mask=mask)
    e_twin = _rms(twin, exact)
    run = partial(launch.decode_attention, emu.kernel, emu.SHARED_BYTES, q, cache, D**-0.5,
                  mask=mask, wide_bytes=WIDE)  # fmt: skip
    tc_plan = launch._plan(emu.kernel, emu.SHARED_BYTES, cache.key_codec, cache.value_codec,
                           mx.uint32, n_rep, L, D, True, True, rope, WIDE)[0]  # fmt: skip
    assert tc_plan == ("attention_tc" if D in (64, 128) and n_rep * L <= 8 and
                       cache.key_codec.bits <= 4 else "attention")  # fmt: skip
    for tensor_cores in (True, False):
        fused = run(tensor_cores=tensor_cores)
        assert fused is not None and not mx.isnan(fused).any()
        assert _rms(fused, exact) <= 2 * e_twin + 1e-6
        assert _rms(fused, twin.astype(mx.float32)) < 0.05 * e_twin, tensor_cores
    # the mean's scores are not optional: the same codes scored without them are far off
    cache.key_mean = mx.zeros_like(cache.key_mean)
    assert _rms(run(), twin.astype(mx.float32)) > 0.5 * e_twin


def test_tensor_core_switch(monkeypatch):
    monkeypatch.setenv(launch.TENSOR_CORES_ENV, "0")
    assert launch.tensor_cores_enabled() is False
    monkeypatch.setenv(launch.TENSOR_CORES_ENV, "yes")
    with pytest.raises(ValueError, match="MLX_TQ_TENSOR_CORES='yes'; allowed: 0, 1"):
        launch.tensor_cores_enabled()
    monkeypatch.delenv(launch.TENSOR_CORES_ENV)
    assert launch.tensor_cores_enabled() is True


def test_metal_has_no_cuda_only_kernels(monkeypatch):
    from mlx_lm_turboquant.kernels import metal
    from mlx_lm_turboquant.kernels.source import CUDA_ONLY

    built = []
    monkeypatch.setattr(metal, "available", lambda: True)
    monkeypatch.setattr(mx.fast, "metal_kernel", lambda **kw: built.append(kw["name"]) or "k")
    metal.kernel.cache_clear()
    try:
        assert all(metal.kernel(op) is None for op in CUDA_ONLY)
        assert metal.kernel("attention") == "k" and built == ["turboquant_attention"]
    finally:
        metal.kernel.cache_clear()


@needs_gxx
@pytest.mark.parametrize("D, kb, vb", [(64, 3, 3), (96, 4, 2), (128, 8, 4)])
def test_emulated_encode_matches_the_codec(monkeypatch, D, kb, vb):
    emulated = _emulate(monkeypatch)
    kc, vc = get_codec(D, kb, 11), get_codec(D, vb, 12)
    k = (mx.random.normal((1, 2, 5, D)) * 4.0).astype(mx.bfloat16)
    v = mx.random.normal((1, 2, 5, D)).astype(mx.bfloat16)
    pk, nk, pv, nv = emulated.encode_kv(kc, k, vc, v)
    for codec, x, packed, norms in ((kc, k, pk, nk), (vc, v, pv, nv)):
        ref_packed, ref_norms = codec.encode(x)
        # a dense matrix product vs mlx's Hadamard transform: codes agree except at ties
        assert float((codec.codes(packed) == codec.codes(ref_packed)).mean()) > 0.99
        assert mx.allclose(norms.astype(mx.float32), ref_norms.astype(mx.float32), rtol=1e-3)


@needs_gxx
def test_emulated_cache_update_uses_the_fused_encode(monkeypatch):
    mx.random.seed(5)
    keys = mx.random.normal((1, 2, 6, 64)) * 3.0
    values = mx.random.normal((1, 2, 6, 64))
    ref = TurboQuantKVCache("turbo4v2")
    ref.update_and_fetch(keys, values)
    ref_k, ref_v = ref.dequantize()
    calls = []
    emulated = _emulate(monkeypatch)
    fused_rows = emulated.encode_rows
    emulated.encode_rows = lambda *a: calls.append(1) or fused_rows(*a)
    cache = TurboQuantKVCache("turbo4v2")
    cache.update_and_fetch(keys, values)
    k_hat, v_hat = cache.dequantize()
    assert calls == [1]  # keys and values in one launch, as one row per token
    # the rows hold exactly what the fused encode of four arrays gives
    rows = token_rows(*emulated.encode_kv(cache.key_codec, keys, cache.value_codec, values))
    assert mx.array_equal(cache.packed[:, :, :6], rows)
    assert _rms(k_hat, keys.astype(mx.float32)) <= 1.01 * _rms(ref_k, keys.astype(mx.float32))
    assert _rms(v_hat, values.astype(mx.float32)) <= 1.01 * _rms(ref_v, values.astype(mx.float32))


def _decode_step(caches, L, D, seed):
    """One update of every cache in ``caches`` with the same random keys and values."""
    mx.random.seed(seed)
    k = (mx.random.normal((1, 2, L, D)) * 2.0).astype(mx.float16)
    v = mx.random.normal((1, 2, L, D)).astype(mx.float16)
    for c in caches:
        c.update_and_fetch(k, v)


@needs_gxx
@pytest.mark.parametrize(
    "scheme, D, L, prefill",
    [("turbo4", 128, 1, 254), ("turbo3", 64, 4, T), ("turbo2v4", 64, 1, T)],
)
def test_emulated_decode_writes_rows_in_place(monkeypatch, scheme, D, L, prefill):
    """Decode steps encode their tokens straight into the cache's token rows (no slice
    update): the very rows the fused encode plus a slice update give, and the same
    attention; a step that needs more capacity grows the buffer and the next ones write
    in place again. 254 tokens: capacity 256, so the third step grows it."""
    mx.random.seed(prefill + D)
    cache = TurboQuantKVCache(scheme, layer_index=3)
    cache.update_and_fetch(mx.random.normal((1, 2, prefill, D)).astype(mx.float16),
                           mx.random.normal((1, 2, prefill, D)).astype(mx.float16))  # fmt: skip
    twin = copy.deepcopy(cache)
    _emulate(monkeypatch)
    q = mx.random.normal((1, 4, L, D)).astype(mx.float16)
    for step in range(4):
        capacity = cache._packed.shape[2]
        twin._exposed = True  # the twin takes the fused encode and a slice update
        _decode_step([cache, twin], L, D, seed=step)
        in_place = cache._pending is not None
        # deepcopy marked the original's rows as seen: its first step copies them once
        assert in_place == (step > 0 and cache.offset <= capacity), step
        out = turboquant_sdpa(q, cache, D**-0.5)  # reads the rows through the chain
        assert mx.array_equal(out, turboquant_sdpa(q, twin, D**-0.5)), step
    assert cache.offset == twin.offset == prefill + 4 * L
    assert mx.array_equal(cache.packed, twin.packed)
    assert cache._pending is None  # reading `packed` waited for the writes


def _count_replays(monkeypatch):
    """Spy on the lane's replays: {"append": [results], "attention": [results]}."""
    seen = {"append": [], "attention": []}
    for name, real in (("append", launch.replay_append), ("attention", launch.replay_attention)):
        def spy(*args, _real=real, _name=name):
            out = _real(*args)
            seen[_name].append(out is not None)
            return out

        monkeypatch.setattr(launch, f"replay_{name}", spy)
    return seen


@needs_gxx
def test_emulated_lane_replays_decode_steps_exactly(monkeypatch):
    """After one step through the dispatcher, decode steps replay the cache's recorded
    set-ups (kernels.Lane): the same rows and outputs as the full path bit for bit, across
    a growth of the buffer (which the replay declines, the full path grows, and replays
    resume); queries of another shape, a mask, or a reset take the full path."""
    D = 64
    mx.random.seed(7)
    cache = TurboQuantKVCache("turbo4", layer_index=2)  # 254 tokens: capacity 256
    cache.update_and_fetch(mx.random.normal((1, 2, 254, D)).astype(mx.float16),
                           mx.random.normal((1, 2, 254, D)).astype(mx.float16))  # fmt: skip
    twin = copy.deepcopy(cache)
    seen = _count_replays(monkeypatch)
    _emulate(monkeypatch)
    q = mx.random.normal((1, 4, 1, D)).astype(mx.float16)
    for step in range(8):
        twin._lane = None  # the twin goes through the dispatcher every step
        _decode_step([cache, twin], 1, D, seed=step)
        out = turboquant_sdpa(q, cache, D**-0.5)
        assert mx.array_equal(out, turboquant_sdpa(q, twin, D**-0.5)), step
    assert mx.array_equal(cache.packed, twin.packed)
    # Step 0 copies the rows the deep copy saw, step 1 binds the in-place encode; step 2
    # has no room (the full path grows the buffer), step 3 finds a new buffer and rebinds.
    assert seen["append"] == [False, False, True, True, True, True], seen["append"]
    assert seen["attention"] == [True, False] + [True] * 5, seen["attention"]

    seen["attention"].clear()
    q4 = mx.random.normal((1, 4, 4, D)).astype(mx.float16)
    for queries, mask in ((q4, None), (q, "causal")):
        out = turboquant_sdpa(queries, cache, D**-0.5, mask=mask)
        assert mx.array_equal(out, turboquant_sdpa(queries, twin, D**-0.5, mask=mask))
    # Both caches declined the 4-query call; the masked ones never reached their lanes.
    assert seen["attention"] == [False, False], seen["attention"]
    kernels.reset()
    turboquant_sdpa(q, cache, D**-0.5)
    assert seen["attention"] == [False, False], seen["attention"]  # stale: not replayed
    assert copy.deepcopy(cache)._lane is None


@needs_gxx
def test_lane_follows_the_backend_serving_now(monkeypatch):
    """A lane belongs to the backend that recorded it: once another backend serves (or
    none does: MLX_TQ_KERNELS=reference on a CPU), decode goes through the dispatcher."""
    D = 64
    cache, _, _ = _cache("turbo4", D)
    q = mx.random.normal((1, 4, 1, D)).astype(mx.float16)
    module = _emulate(monkeypatch)
    for step in range(2):
        _decode_step([cache], 1, D, seed=step)
        turboquant_sdpa(q, cache, D**-0.5)
    assert cache._lane is not None and cache._lane.current()
    seen = _count_replays(monkeypatch)
    monkeypatch.setattr(kernels, "active_backend", lambda: None)  # the pure-MLX path
    _decode_step([cache], 1, D, seed=5)
    out = turboquant_sdpa(q, cache, D**-0.5)
    assert seen == {"append": [], "attention": []}
    monkeypatch.setattr(kernels, "active_backend", lambda: module)  # serving again
    for seed in (6, 7):  # the pure path read `packed`: the first update copies the rows
        _decode_step([cache], 1, D, seed=seed)
        out = turboquant_sdpa(q, cache, D**-0.5)
    assert seen == {"append": [True], "attention": [True, True]}
    assert mx.allclose(out, reference_sdpa(q, cache, D**-0.5), atol=1e-3)


@needs_gxx
def test_rows_seen_outside_the_cache_are_never_written_in_place(monkeypatch):
    """A state taken from the cache, and a deep copy of it, keep their values when the cache
    is trimmed and decodes on: the rows they read are copied before the next write. (A
    shallow copy shares the buffer object, as with mlx-lm's KVCache.)"""
    cache, _, _ = _cache("turbo4", 64)
    _emulate(monkeypatch)
    _decode_step([cache], 1, 64, seed=1)
    assert cache._pending is not None  # in place
    state = cache.state[:4]
    deep = copy.deepcopy(cache)
    before = [np.array(a) for a in state]
    rows = np.array(cache._packed)
    cache.trim(2)
    for seed in (2, 3):  # the rows the state holds are written again
        _decode_step([cache], 1, 64, seed=seed)
    assert all(np.array_equal(np.array(a), b) for a, b in zip(state, before))
    assert np.array_equal(np.array(deep._packed), rows)
    assert cache._pending is not None  # and later steps write in place again

