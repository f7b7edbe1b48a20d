"""What a decode step's per-layer pieces cost when pipelined like mlx-lm's generate loop.

Each variant builds 32 "layers" per step; a layer's output feeds the next layer's input, so
the steps form one chain as in a model. Per step it reports the host time building the
graph, the host time inside ``mx.async_eval`` (where mlx encodes the launches), and the wall
time per step with the next step built while the GPU runs the last one.

    python benchmarks/step_costs.py --context 4096 --out results/
"""

import argparse
import json
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache

import mlx_lm_turboquant
from mlx_lm_turboquant import TurboQuantKVCache, turboquant_sdpa
from mlx_lm_turboquant.kernels import cuda

LAYERS, H_Q, H_KV, D = 32, 32, 8, 128

_COPY = None


def copy_kernel():
    """A trivial custom kernel (one block copying 128 values): the fixed cost of a launch."""
    global _COPY
    if _COPY is None:
        _COPY = mx.fast.cuda_kernel(
            name="step_costs_copy", input_names=["x"], output_names=["y"],
            source="int i = threadIdx.x; y[i] = x[i];",
        )  # fmt: skip
    return _COPY


def run_copy(x):
    (y,) = copy_kernel()(inputs=[x], grid=(x.size, 1, 1), threadgroup=(min(x.size, 1024), 1, 1),
                         output_shapes=[x.shape], output_dtypes=[x.dtype])  # fmt: skip
    return y


_TEMPLATE = [(f"T{i}", i) for i in range(24)] + [("QT", mx.bfloat16)]
_PAD = "// padding as long as the tensor-core attention kernel's source\n" * 800


def trivial_kernel(n, outs=1, template=False, big_source=False):
    """A trivial custom kernel (one block copying 128 values) of ``n`` inputs and ``outs``
    outputs, as a function of its inputs; with ``template`` also 25 template arguments and
    with ``big_source`` a 40 KB source, as the tensor-core attention kernel has."""
    k = mx.fast.cuda_kernel(
        name=f"step_costs_{n}_{outs}_{int(big_source)}", input_names=[f"x{i}" for i in range(n)],
        output_names=["y", "a", "b"][:outs],
        source=(_PAD if big_source else "") + "int i = threadIdx.x; y[i] = x0[i];",
    )  # fmt: skip

    def run(*xs):
        return k(inputs=list(xs), grid=(128, 1, 1), threadgroup=(128, 1, 1),
                 template=_TEMPLATE if template else None, output_shapes=[xs[0].shape] * outs,
                 output_dtypes=[xs[0].dtype] * outs)[0]  # fmt: skip

    return run


def replay_add(n):
    """``mx.compile`` of one add taking the first of ``n`` inputs (the rest unread)."""
    return mx.compile(lambda *xs: xs[0] + 1)


def make_variants(T):
    def filled(kind):
        caches = []
        for i in range(LAYERS):
            c = KVCache() if kind == "fp16" else TurboQuantKVCache(kind, layer_index=i)
            k = mx.random.normal((1, H_KV, T, D)).astype(mx.bfloat16)
            c.update_and_fetch(k, k)
            mx.eval([a for a in (c.keys, c.values) if a is not None])
            caches.append(c)
        return caches

    fp, tq = filled("fp16"), filled("turbo4")
    TurboQuantKVCache.packs_rows = False  # the same, keeping four arrays instead of rows
    tq_apart = filled("turbo4")
    TurboQuantKVCache.packs_rows = True
    big = [mx.zeros((1, H_KV, T + 256, 16), mx.uint32) for _ in range(LAYERS)]
    mx.eval(big)

    def kv_of(x):  # the new token's keys and values, from the last layer's output
        kv = x[:, :H_KV]  # row-contiguous, as a model's keys after RoPE (no copy at launch)
        return kv, kv

    def fp16_layer(i, x):
        k, v = kv_of(x)
        keys, values = fp[i].update_and_fetch(k, v)
        return mx.fast.scaled_dot_product_attention(x, keys, values, scale=D**-0.5)

    def tq_layer(i, x):
        k, v = kv_of(x)
        tq[i].update_and_fetch(k, v)
        return turboquant_sdpa(x, tq[i], D**-0.5)

    def tq_apart_layer(i, x):
        k, v = kv_of(x)
        tq_apart[i].update_and_fetch(k, v)
        return turboquant_sdpa(x, tq_apart[i], D**-0.5)

    def uncompiled(layer):  # the CUDA launches built per call, not replayed from mx.compile
        def run(i, x):
            cuda.COMPILED = False
            try:
                return layer(i, x)
            finally:
                cuda.COMPILED = True

        return run

    def tq_update_only(i, x):
        k, v = kv_of(x)
        tq[i].update_and_fetch(k, v)
        return x + tq[i].buffers()[0][:, :1, :1, :1].astype(x.dtype)  # keep the update

    def fp16_update_only(i, x):
        k, v = kv_of(x)
        keys, _ = fp[i].update_and_fetch(k, v)
        return x + keys[:, :1, :1, :1]

    def tq_attention_only(i, x):
        return turboquant_sdpa(x, tq[i], D**-0.5)

    def fp16_attention_only(i, x):
        return mx.fast.scaled_dot_product_attention(
            x, fp[i].keys[:, :, :T], fp[i].values[:, :, :T], scale=D**-0.5)  # fmt: skip

    def copies(n):
        def layer(i, x):
            for _ in range(n):
                x = run_copy(x)
            return x

        return layer

    def adds(n):
        def layer(i, x):
            for _ in range(n):
                x = x + 1
            return x

        return layer

    def slice_updates(n):
        def layer(i, x):
            row = x.reshape(1, H_KV, 4, D)[:, :, :1, :16].astype(mx.uint32)
            for _ in range(n):
                big[i][:, :, T : T + 1] = row
            return x + big[i][:, :1, T : T + 1, :1].astype(x.dtype)

        return layer

    def trims():
        for c in fp + tq + tq_apart:
            c.trim(1)

    return {
        "fp16 layer (update + sdpa)": (fp16_layer, trims),
        "turbo4 layer (update + attention)": (tq_layer, trims),
        "turbo4 layer, four arrays": (tq_apart_layer, trims),
        "turbo4 layer, not compiled": (uncompiled(tq_layer), trims),
        "fp16 update only": (fp16_update_only, trims),
        "turbo4 update only": (tq_update_only, trims),
        "turbo4 update only, not compiled": (uncompiled(tq_update_only), trims),
        "fp16 sdpa only": (fp16_attention_only, None),
        "turbo4 attention only": (tq_attention_only, None),
        "1 trivial custom kernel": (copies(1), None),
        "4 trivial custom kernels": (copies(4), None),
        "1 add": (adds(1), None),
        "4 adds": (adds(4), None),
        "1 slice update": (slice_updates(1), None),
        "4 slice updates": (slice_updates(4), None),
    }


def call_costs(T, calls=400):
    """Host microseconds to build one call of each piece (graph building only, no eval): the
    costs that add up to a layer's build time, one by one."""
    from mlx_lm_turboquant.kernels import launch

    c = TurboQuantKVCache("turbo4", layer_index=1)
    f = KVCache()
    k = mx.random.normal((1, H_KV, T, D)).astype(mx.bfloat16)
    c.update_and_fetch(k, k)
    f.update_and_fetch(k, k)
    q = mx.random.normal((1, H_Q, 1, D)).astype(mx.bfloat16)
    kv = q[:, :H_KV]
    mx.eval(c.buffers(), f.keys, f.values, q)
    kc, vc = c.key_codec, c.value_codec
    kern = cuda.kernel

    def fp16_update():
        f.update_and_fetch(kv, kv)
        f.trim(1)

    def tq_update():
        c.update_and_fetch(kv, kv)
        c.trim(1)

    chain = launch._chain(c)
    launch.decode_attention(kern, cuda.SHARED_BYTES, q, c, 0.1, compiled=True)
    _, setup, n_splits, meta, _ = chain.fast
    count, d16 = launch.device_tokens(c), launch._dummy(mx.float16)
    rows_ = c._packed
    wide = [q] * 17  # a custom kernel's fixed costs: inputs, template, source size, compile

    def replay_attention():
        return launch._run(setup, chain, q, 0.1, rows_, rows_, d16, d16, None, count, meta,
                           None, None, None, n_splits)  # fmt: skip

    pieces = {}
    for n in (1, 6, 12, 18):  # what a replay costs per input: custom kernel, then an add
        xs = [q] * n
        for outs in (1, 3):
            fn = mx.compile(trivial_kernel(n, outs))
            pieces[f"mx.compile'd trivial kernel, {n} in, {outs} out"] = partial(fn, *xs)
        pieces[f"mx.compile'd add, {n} inputs"] = partial(replay_add(n), *xs)
        pieces[f"trivial kernel, {n} inputs"] = partial(trivial_kernel(n), *xs)
        pieces[f"trivial kernel, {n} inputs, template"] = partial(trivial_kernel(n, 1, True), *xs)
    big = trivial_kernel(17, 3, template=True, big_source=True)
    pieces |= {
        "trivial custom kernel, 17 inputs": partial(trivial_kernel(17, 3), *wide),
        "trivial kernel, 17 in, template, 40 KB": partial(big, *wide),
        "the same, mx.compile": partial(mx.compile(big), *wide),
        "attention graph replay (launch._run)": replay_attention,
        "add": lambda: q + 1,
        "trivial custom kernel": lambda: run_copy(q),
        "fp16 sdpa": lambda: mx.fast.scaled_dot_product_attention(q, f.keys[:, :, :T],
                                                                  f.values[:, :, :T], scale=0.1),
        "fp16 update_and_fetch": fp16_update,
        "turbo4 update_and_fetch": tq_update,
        "turboquant_sdpa": lambda: turboquant_sdpa(q, c, 0.1),
        "launch.decode_attention compiled": lambda: launch.decode_attention(
            kern, cuda.SHARED_BYTES, q, c, 0.1, compiled=True),
        "launch.decode_attention plain": lambda: launch.decode_attention(
            kern, cuda.SHARED_BYTES, q, c, 0.1, compiled=False),
        "kernels.encode_rows": lambda: mlx_lm_turboquant.kernels.encode_rows(kc, kv, vc, kv),
        "launch.encode_rows compiled": lambda: launch.encode_rows(kern, kc, kv, vc, kv, True),
        "launch.encode_rows plain": lambda: launch.encode_rows(kern, kc, kv, vc, kv, False),
    }  # fmt: skip
    rows = []
    for name, fn in pieces.items():
        for _ in range(3):  # builds and compiles; a cache's first update may copy its rows
            out = fn()  # and the next one binds the in-place encode (a kernel of its own)
            mx.eval(out if out is not None else [])
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        us = (time.perf_counter() - t0) / calls * 1e6
        mx.eval(c.buffers(), f.keys, f.values)
        rows.append({"piece": name, "build_us": us, "context": T})
        print(f"T={T:<6} build one call: {name:<36} {us:6.1f} us", flush=True)
    return rows


def measure(layer, after, steps=64, rounds=3):
    x0 = mx.random.normal((1, H_Q, 1, D)).astype(mx.bfloat16)
    build, dispatch = [0.0], [0.0]

    def step(x):
        t = time.perf_counter()
        for i in range(LAYERS):
            x = layer(i, x)
        build[0] += time.perf_counter() - t
        t = time.perf_counter()
        mx.async_eval(x)
        dispatch[0] += time.perf_counter() - t
        if after is not None:
            after()
        return x

    for _ in range(3):
        mx.eval(step(x0))
    out = []
    for _ in range(rounds):
        build[0] = dispatch[0] = 0.0
        mx.synchronize()
        t0 = time.perf_counter()
        x = x0
        for _ in range(steps):
            nxt = step(x)
            x.item() if x.size == 1 else mx.eval(x)
            x = nxt
        mx.eval(x)
        wall = (time.perf_counter() - t0) / steps
        out.append((wall, build[0] / steps, dispatch[0] / steps))
    wall, b, d = sorted(out)[len(out) // 2]
    return {"wall_ms": wall * 1e3, "build_ms": b * 1e3, "async_eval_ms": d * 1e3}


def profile(layer, after, steps=20):
    """cProfile of the host work building ``steps`` steps (top functions by own time)."""
    import cProfile
    import pstats

    x0 = mx.random.normal((1, H_Q, 1, D)).astype(mx.bfloat16)
    pr = cProfile.Profile()
    for step in range(steps + 3):  # three warm-up steps: kernel builds are not profiled
        if step == 3:
            pr = cProfile.Profile()
        x = x0
        pr.enable()
        for i in range(LAYERS):
            x = layer(i, x)
        pr.disable()
        mx.eval(x)
        if after is not None:
            after()
    pstats.Stats(pr).sort_stats("tottime").print_stats(30)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--context", type=int, nargs="+", default=[4096])
    p.add_argument("--out", default=None)
    p.add_argument("--profile", default=None, help="a variant whose graph building to profile")
    args = p.parse_args()
    mlx_lm_turboquant.activate()
    result = {"device": str(mx.default_device()), "layers": LAYERS, "rows": []}
    for T in args.context:
        if mx.cuda.is_available():
            result.setdefault("calls", []).extend(call_costs(T))
        variants = make_variants(T)
        if args.profile:
            profile(*variants[args.profile])
        for name, (layer, after) in variants.items():
            if "custom" in name and not mx.cuda.is_available():
                continue
            r = measure(layer, after)
            r.update(context=T, variant=name)
            result["rows"].append(r)
            print(f"T={T:<6} {name:<36} wall {r['wall_ms']:6.2f} ms/step  build "
                  f"{r['build_ms']:5.2f}  async_eval {r['async_eval_ms']:5.2f}  "
                  f"({r['wall_ms'] * 1e3 / LAYERS:5.1f} us/layer)", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "step_costs.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
