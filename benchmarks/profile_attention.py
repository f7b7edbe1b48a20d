"""One fused turbo4 decode attention at a long context, for a profiler (Nsight Compute):

    ncu --section WarpStateStats --section SchedulerStats -k regex:attention -c 1 \\
        python benchmarks/profile_attention.py --context 131072

``--scheme fp16`` runs mlx's own SDPA on a bf16 cache of the same shape instead, so both
kernels can be timed by one profiler command (``--clock-control none`` for the clocks a
user's run gets). Several contexts and schemes run in one process, in order, with
``--order FILE`` recording which calls were which. ``bash benchmarks/device_tc.sh
ktimes`` writes ``kt.csv`` and ``kt_order.json`` that way; ``--summarize DIR [DIR ...]``
turns them into a table and JSON (one directory per code version, the first one's fp16 as
the baseline).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx

import mlx_lm_turboquant
from mlx_lm_turboquant import turboquant_sdpa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import bench_cache  # noqa: E402  (sibling scripts)
from profile_step import kernel_durations  # noqa: E402


def call_times(path):
    """GPU microseconds of each attention call in an ncu CSV: our kernel, or cuDNN's SDPA
    plus the reduction that follows it."""
    calls = []
    for name, us in kernel_durations(path):
        if "turboquant_attention" in name or "sdpa" in name:
            calls.append(us)
        elif "lean_reduction" in name and calls:
            calls[-1] += us
    return calls


def summarize(dirs, out=None):
    """Median GPU time per call (the first call, which compiles, left out) per scheme and
    length, for each directory of ``kt.csv`` and ``kt_order.json``; ratios to the first
    directory's fp16."""
    table = {}
    for d in dirs:
        calls = call_times(Path(d) / "kt.csv")
        order = json.loads((Path(d) / "kt_order.json").read_text())
        if len(calls) != sum(n for _, _, n in order):
            raise ValueError(f"{d}: {len(calls)} attention calls, the order lists "
                             f"{sum(n for _, _, n in order)}")  # fmt: skip
        start = 0
        for scheme, tokens, n in order:
            group, start = calls[start:start + n], start + n
            if n < 2:
                raise ValueError(f"{d}: {scheme} at {tokens}: {n} calls, need at least 2")
            table.setdefault(int(tokens), {})[f"{Path(d).name}/{scheme}"] = {
                "us": statistics.median(group[1:]), "calls_us": group}
    for tokens, row in sorted(table.items()):
        fp16 = row.get(f"{Path(dirs[0]).name}/fp16", {}).get("us")
        cells = []
        for key, r in row.items():
            ratio = f" {fp16 / r['us']:.2f}x" if fp16 and not key.endswith("/fp16") else ""
            cells.append(f"{key} {r['us']:.1f} us{ratio}")
        print(f"{tokens:>7} | " + " | ".join(cells))
    if out:
        Path(out).write_text(json.dumps(table, indent=1))
    return table


def run(scheme, context, calls):
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.bfloat16)
    if scheme == "fp16":
        k, v = (mx.random.normal((1, 8, context, 128)).astype(mx.bfloat16) for _ in "kv")
        for _ in range(calls):
            mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=128**-0.5))
        return
    cache = bench_cache(scheme)
    for start in range(0, context, 8192):  # in chunks: bounded temporary memory
        n = min(8192, context - start)
        k = mx.random.normal((1, 8, n, 128)).astype(mx.bfloat16)
        cache.update_and_fetch(k, k)
        mx.eval(cache.keys, cache.values)
    for _ in range(calls):
        mx.eval(turboquant_sdpa(q, cache, 128**-0.5))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, nargs="+", default=[131072])
    p.add_argument("--scheme", nargs="+", default=["turbo4"])
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--order", help="write [[scheme, context, calls], ...] here (JSON)")
    p.add_argument("--summarize", nargs="+", metavar="DIR",
                   help="print (and with --json write) the table of ktimes runs")
    p.add_argument("--json", help="with --summarize: write the table here")
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize, args.json)
        return
    mlx_lm_turboquant.activate()
    order = []
    for context in args.context:
        for scheme in args.scheme:
            run(scheme, context, args.calls)
            order.append([scheme, context, args.calls])
            mx.clear_cache()
    if args.order:
        Path(args.order).write_text(json.dumps(order))


if __name__ == "__main__":
    main()
