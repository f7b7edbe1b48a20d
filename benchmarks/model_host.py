"""Host time to build one decode step of the Llama-3-8B-shaped model (random 4-bit weights):
fp16 cache against turbo4, with Python's garbage collector on and off, and a profile of
the turbo4 steps (functions by own time). Run on the GPU machine:

    python benchmarks/model_host.py --context 4096
"""

import argparse
import cProfile
import gc
import pstats
import statistics
import time

import mlx.core as mx

import mlx_lm_turboquant
from bench_kernels import _fill, llama8b, next_token


def build_times(model, cache, steps=32):
    """Host seconds per step spent building the graph (pipelined as in decode_rate)."""
    y = mx.array([1])
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        nxt = next_token(model, cache, y)
        if i >= 3:
            times.append(time.perf_counter() - t)
        mx.async_eval(nxt)
        y = nxt
    mx.eval(y)
    for c in cache:
        c.trim(steps + 3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=4096)
    args = p.parse_args()
    mlx_lm_turboquant.activate()
    model = llama8b()
    caches = {kind: _fill(model, kind, args.context) for kind in ("fp16", "turbo4")}
    for rnd in range(3):
        for kind, cache in caches.items():
            on = build_times(model, cache)
            gc.disable()
            off = build_times(model, cache)
            gc.enable()
            print(f"round {rnd} {kind:7s} build {on * 1e3:.2f} ms/step (gc off {off * 1e3:.2f})",
                  flush=True)  # fmt: skip
    for kind in ("fp16", "turbo4"):
        pr = cProfile.Profile()
        pr.enable()
        build_times(model, caches[kind], steps=16)
        pr.disable()
        print(f"--- profile {kind}")
        pstats.Stats(pr).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
