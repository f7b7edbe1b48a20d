"""Host time of one decode step of the Llama-3-8B-shaped model (random 4-bit weights):
fp16 cache against turbo4. Per step: the time building the graph, the time inside
``mx.async_eval`` (where mlx encodes the launches), and the wall time pipelined as in
mlx-lm's generate loop; then building with Python's garbage collector on and off, and a
profile of the steps (functions by own time). Run on the GPU machine:

    python benchmarks/model_host.py --context 4096 --kinds fp16 turbo4
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


def step_split(model, cache, steps=32):
    """Medians per step (ms): graph building, ``mx.async_eval``, and the wall time with the
    next step built while the GPU runs this one (as ``bench_kernels.decode_rate``)."""
    build, dispatch = [], []

    def step(y):
        t0 = time.perf_counter()
        out = next_token(model, cache, y)
        t1 = time.perf_counter()
        mx.async_eval(out)
        build.append(t1 - t0)
        dispatch.append(time.perf_counter() - t1)
        return out

    y = mx.array([1])
    for _ in range(3):
        y = step(y)
        mx.eval(y)
    build.clear()
    dispatch.clear()
    mx.synchronize()
    t0 = time.perf_counter()
    nxt = step(y)
    for _ in range(steps - 1):
        y, nxt = nxt, step(nxt)
        y.item()
    nxt.item()
    wall = (time.perf_counter() - t0) / steps
    for c in cache:
        c.trim(steps + 3)
    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    return ms(build), ms(dispatch), wall * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--kinds", nargs="+", default=["fp16", "turbo4"])
    p.add_argument("--profile", nargs="*", default=["fp16", "turbo4"], help="kinds to profile")
    args = p.parse_args()
    mlx_lm_turboquant.activate()
    model = llama8b()
    caches = {kind: _fill(model, kind, args.context) for kind in args.kinds}
    for rnd in range(3):
        for kind, cache in caches.items():
            b, d, w = step_split(model, cache)
            print(f"round {rnd} {kind:7s} T={args.context} build {b:.2f} ms/step, async_eval "
                  f"{d:.2f}, wall {w:.2f} ({1e3 / w:.1f} tok/s)", flush=True)  # fmt: skip
    for rnd in range(2):
        for kind, cache in caches.items():
            on = build_times(model, cache)
            gc.disable()
            off = build_times(model, cache)
            gc.enable()
            print(f"round {rnd} {kind:7s} build {on * 1e3:.2f} ms/step (gc off {off * 1e3:.2f})",
                  flush=True)  # fmt: skip
    for kind in args.profile:
        pr = cProfile.Profile()
        pr.enable()
        build_times(model, caches[kind], steps=16)
        pr.disable()
        print(f"--- profile {kind}")
        pstats.Stats(pr).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
