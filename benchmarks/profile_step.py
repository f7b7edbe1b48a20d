"""GPU time of one decode step of the Llama-3-8B shape, kernel by kernel, per cache kind.

Each kind's step runs between ``cuProfilerStart`` and ``cuProfilerStop`` with a
marker kernel after it, so one profiler run captures every kind and the summary can tell
the steps apart (the marker is not counted):

    ncu --csv --metrics gpu__time_duration.sum --profile-from-start off \\
        python benchmarks/profile_step.py --context 4096 > step.csv
    python benchmarks/profile_step.py --summarize step.csv

The sum of kernel durations is the GPU's busy time for a step; a decode step whose wall
time is far above it is bound by the host (graph building and dispatch), not the GPU.
"""

import argparse
import csv
import ctypes
import ctypes.util
import io
import json
import re
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MARKER = "tq_step_marker"


def _profiler():
    """The CUDA driver's profiler range calls (the context is mlx's, already current)."""
    lib = ctypes.CDLL(ctypes.util.find_library("cuda") or "libcuda.so.1")
    return lib.cuProfilerStart, lib.cuProfilerStop


def _marker(kind):
    kernel = mx.fast.cuda_kernel(
        name=MARKER, input_names=["x"], output_names=["y"], source="y[0] = x[0];"
    )
    (y,) = kernel(inputs=[mx.array([len(kind)], mx.int32)], grid=(1, 1, 1),
                  threadgroup=(1, 1, 1), output_shapes=[(1,)], output_dtypes=[mx.int32])  # fmt: skip
    mx.eval(y)


def profile(kinds, context, warmup=4):
    import mlx_lm_turboquant
    from bench_kernels import _fill, llama8b, next_token

    mlx_lm_turboquant.activate()
    start, stop = _profiler()
    model = llama8b()
    for kind in kinds:
        cache = _fill(model, kind, context)
        y = mx.array([1])
        for _ in range(warmup):  # kernel builds, allocator, compiled graphs
            y = next_token(model, cache, y)
            mx.eval(y)
        mx.synchronize()
        start()
        y = next_token(model, cache, y)
        mx.eval(y)
        mx.synchronize()
        _marker(kind)
        mx.synchronize()
        stop()
        print(f"profiled one step: {kind} at {context} tokens", file=sys.stderr, flush=True)
        del cache
        mx.clear_cache()


_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}


def _short(name):
    """A kernel's family: its name without template arguments, parameters or mlx's
    hashed suffixes."""
    name = re.split(r"[<(]", name)[0].split("::")[-1]
    return re.sub(r"_[0-9a-f]{6,}$", "", name)[:56]


def kernel_durations(path):
    """``[(kernel name, GPU microseconds)]`` in launch order from an ncu CSV of
    ``gpu__time_duration.sum`` (the profiler's own log lines skipped)."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.startswith('"')]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    if not rows or "Kernel Name" not in rows[0]:
        raise ValueError(f"{path}: no ncu CSV table (run ncu with --csv)")
    return [(r["Kernel Name"],
             float(r["Metric Value"].replace(",", "")) * _UNITS[r["Metric Unit"]])
            for r in rows if r.get("Metric Name") == "gpu__time_duration.sum"]  # fmt: skip


def summarize(path, kinds):
    """Per kind: kernel count, GPU microseconds, and the families that take the time."""
    steps, current = [], {}
    for name, us in kernel_durations(path):
        if MARKER in name:
            steps.append(current)
            current = {}
            continue
        family = _short(name)
        n, total = current.get(family, (0, 0.0))
        current[family] = (n + 1, total + us)
    if len(steps) != len(kinds):
        raise ValueError(f"{path}: {len(steps)} profiled steps, expected {len(kinds)} ({kinds})")
    out = {}
    for kind, fams in zip(kinds, steps):
        total = sum(us for _, us in fams.values())
        count = sum(n for n, _ in fams.values())
        out[kind] = {"kernels": count, "gpu_us": total,
                     "families": {k: {"count": n, "us": us} for k, (n, us) in fams.items()}}  # fmt: skip
        print(f"{kind}: {count} kernels, {total / 1e3:.3f} ms of GPU time per step")
        for fam, (n, us) in sorted(fams.items(), key=lambda kv: -kv[1][1])[:12]:
            print(f"    {fam:<56} {n:5d} x {us:9.1f} us")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--kinds", nargs="+", default=["fp16", "turbo4"])
    p.add_argument("--summarize", metavar="NCU_CSV", help="print the table of a profiled run")
    p.add_argument("--json", help="with --summarize: also write the table here")
    args = p.parse_args()
    if args.summarize:
        out = summarize(args.summarize, args.kinds)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    else:
        profile(args.kinds, args.context)


if __name__ == "__main__":
    main()
