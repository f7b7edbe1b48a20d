"""Where a decode step's time goes per layer: host-side graph building and per-op costs.

    python benchmarks/overhead.py      # prints microseconds per call of each piece
"""

import time

import mlx.core as mx
from mlx_lm.models.cache import KVCache

import mlx_lm_turboquant
from mlx_lm_turboquant import TurboQuantKVCache, kernels, turboquant_sdpa


def per_call(fn, n=200):
    """(host microseconds to build the graph, microseconds per call with an eval each)."""
    for _ in range(5):
        mx.eval(fn())
    t0 = time.perf_counter()
    outs = [fn() for _ in range(n)]
    build = (time.perf_counter() - t0) / n
    mx.eval(outs)
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        mx.eval(fn())
    mx.synchronize()
    return build * 1e6, (time.perf_counter() - t0) / n * 1e6


def main():
    mlx_lm_turboquant.activate()
    for T in (4096, 32768):
        k = mx.random.normal((1, 8, T, 128)).astype(mx.bfloat16)
        v = mx.random.normal((1, 8, T, 128)).astype(mx.bfloat16)
        k1, v1 = k[:, :, :1], v[:, :, :1]
        q = mx.random.normal((1, 32, 1, 128)).astype(mx.bfloat16)
        tq, fp = TurboQuantKVCache("turbo4"), KVCache()
        for c in (tq, fp):  # one decode step first, so the buffers have room
            c.update_and_fetch(k, v)
            c.update_and_fetch(k1, v1)
            c.trim(1)
        mx.eval(tq.keys, tq.values, fp.keys, fp.values)

        def tq_update():
            tq.update_and_fetch(k1, v1)
            tq.trim(1)
            return [tq.keys, tq.key_norms, tq.values, tq.value_norms]

        def fp_update():
            fp.update_and_fetch(k1, v1)
            fp.trim(1)
            return [fp.keys, fp.values]

        rows = {
            "fused encode (one codec)": lambda: kernels.encode(tq.key_codec, k1),
            "turbo4 update_and_fetch": tq_update,
            "fp16 KVCache update_and_fetch": fp_update,
            "turbo4 attention (fused)": lambda: turboquant_sdpa(q, tq, 128**-0.5),
            "fp16 sdpa": lambda: mx.fast.scaled_dot_product_attention(
                q, fp.keys[..., :T, :], fp.values[..., :T, :], scale=0.088
            ),
            "empty custom-kernel-sized op (x + 1)": lambda: q + 1,
        }
        for name, fn in rows.items():
            build, total = per_call(fn)
            print(f"T={T:<6} {name:<36} build {build:8.1f} us   build+run {total:8.1f} us",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
