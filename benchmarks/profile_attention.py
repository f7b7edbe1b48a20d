"""One fused turbo4 decode attention at a long context, for a profiler (Nsight Compute):

    ncu --section WarpStateStats --section SchedulerStats -k regex:attention -c 1 \\
        python benchmarks/profile_attention.py --context 131072

``--scheme fp16`` runs mlx's own SDPA on a bf16 cache of the same shape instead, so both
kernels can be timed by one profiler command (``--clock-control none`` for the clocks a
user's run gets). Several contexts and schemes run in one process, in order, with
``--order FILE`` recording which calls were which. ``bash benchmarks/device_tc.sh
ktimes`` writes ``kt.csv`` and ``kt_order.json`` that way; ``--summarize DIR [DIR ...]``
turns them into a table and JSON (one directory per code version, the first one's fp16 as
the baseline). ``--stalls CSV`` summarizes Nsight Compute's per-instruction page of one
call (``bash benchmarks/device_tc.sh stalls``): stall reasons over all samples, the
instruction mix, and the instructions with the most samples.
"""

import argparse
import collections
import csv
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx

import mlx_lm_turboquant
from mlx_lm_turboquant import turboquant_sdpa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import D, H_KV, H_Q, _kernel_variant, filled_cache  # noqa: E402  (siblings)
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


def _number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:  # "-", "" and the like
        return 0.0


def stall_summary(path, top=8):
    """Stall reasons (share of all samples), executed warp instructions per opcode and the
    ``top`` instructions by samples, from ``ncu --page source --print-source sass --csv``."""
    rows = list(csv.reader(Path(path).read_text().splitlines()))
    start = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
    if start is None:
        raise ValueError(f"{path}: no per-instruction table (a row starting with 'Address')")
    header, body = rows[start], [r for r in rows[start + 1:] if len(r) == len(rows[start])]
    col = {name: i for i, name in enumerate(header)}
    samples_col = col.get("Warp Stall Sampling (All Samples)")
    executed_col = col.get("Instructions Executed")
    if samples_col is None or executed_col is None:
        raise ValueError(f"{path}: no stall-sampling or executed-instruction columns")
    reasons = [n for n in header if n.startswith("stall_") and "(Not Issued)" not in n]
    stalls = collections.Counter()
    opcodes = collections.Counter()
    for r in body:
        for name in reasons:
            stalls[name[len("stall_"):]] += _number(r[col[name]])
        words = r[1].split()
        words = words[1:] if words and words[0].startswith("@") else words  # a predicate
        if words:
            opcodes[words[0].split(".")[0]] += _number(r[executed_col])
    total = sum(stalls.values()) or 1.0
    hot = sorted(body, key=lambda r: -_number(r[samples_col]))[:top]
    return {
        "samples": sum(stalls.values()),
        "stalls": {k: round(v / total, 4) for k, v in stalls.most_common() if v},
        "instructions": sum(opcodes.values()),
        "opcodes": dict(opcodes.most_common()),
        "hot": [{"samples": _number(r[samples_col]), "sass": r[1].strip()} for r in hot],
    }


def print_stalls(summary, steps=None):
    """The summary as text; ``steps``: warp steps of the call, to count per step."""
    print(f"{summary['samples']:.0f} stall samples")
    for reason, share in summary["stalls"].items():
        print(f"  {reason:<18} {100 * share:5.1f}%")
    per = f" ({summary['instructions'] / steps:.0f} per step)" if steps else ""
    print(f"{summary['instructions']:.0f} warp instructions{per}; most executed:")
    for op, n in list(summary["opcodes"].items())[:10]:
        print(f"  {op:<8} {n / steps if steps else n:10.1f}")
    print("most sampled:")
    for h in summary["hot"]:
        print(f"  {h['samples']:6.0f}  {h['sass']}")


def run(scheme, context, calls):
    q = mx.random.normal((1, H_Q, 1, D)).astype(mx.bfloat16)
    if scheme == "fp16":
        k, v = (mx.random.normal((1, H_KV, context, D)).astype(mx.bfloat16) for _ in "kv")
        for _ in range(calls):
            mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5))
        return
    cache = filled_cache(scheme.split(":")[0], context)
    with _kernel_variant(scheme):  # scheme:variant as in bench_kernels
        for _ in range(calls):
            mx.eval(turboquant_sdpa(q, cache, D**-0.5))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, nargs="+", default=[131072])
    p.add_argument("--scheme", nargs="+", default=["turbo4"])
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--order", help="write [[scheme, context, calls], ...] here (JSON)")
    p.add_argument("--summarize", nargs="+", metavar="DIR",
                   help="print (and with --json write) the table of ktimes runs")
    p.add_argument("--json", help="with --summarize or --stalls: write the result here")
    p.add_argument("--stalls", metavar="CSV",
                   help="summarize ncu's per-instruction page of one call (see device_tc.sh)")
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize, args.json)
        return
    if args.stalls:
        summary = stall_summary(args.stalls)
        # the profiled call's warp steps: 16 tokens of one KV head each (B = 1)
        steps = args.context[0] * H_KV // 16 if len(args.context) == 1 else None
        print_stalls(summary, steps=steps)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
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
