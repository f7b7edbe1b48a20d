"""One fused turbo4 decode attention at a long context, for a profiler (Nsight Compute):

    ncu --section WarpStateStats --section SchedulerStats -k regex:attention -c 1 \\
        python benchmarks/profile_attention.py --context 131072
"""

import argparse

import mlx.core as mx

import mlx_lm_turboquant
from mlx_lm_turboquant import TurboQuantKVCache, turboquant_sdpa


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--scheme", default="turbo4")
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args()
    mlx_lm_turboquant.activate()
    cache = TurboQuantKVCache(args.scheme)
    for start in range(0, args.context, 8192):  # in chunks: bounded temporary memory
        n = min(8192, args.context - start)
        k = mx.random.normal((1, 8, n, 128)).astype(mx.bfloat16)
        cache.update_and_fetch(k, k)
        mx.eval(cache.keys, cache.values)
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.bfloat16)
    for _ in range(args.calls):
        mx.eval(turboquant_sdpa(q, cache, 128**-0.5))


if __name__ == "__main__":
    main()
