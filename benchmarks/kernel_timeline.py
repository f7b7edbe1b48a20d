"""Where a tensor-core attention call's time goes, per block (GPU only):

    python benchmarks/kernel_timeline.py --schemes turbo4 turbo2 --json timeline.json

The kernel source is patched (``stamped``) so that thread 0 of every block writes
``%globaltimer`` and ``clock64`` at eight points, and ``%smid``, into the merge counter's
buffer past the words it uses: entry, end of the set-up (tables built), end of the token loop
(every warp), partials written, counted in, and for each (batch, KV head)'s last block the
spans' weights, the merged rows and the end. Printed per call length: when blocks reach those
points (percentiles over blocks, from the first block's entry), each phase's median and
maximum over blocks (medians over calls 2 to 6), and the token loop's median by how many
blocks shared the SM (the last call's). Each call gets a fresh counter written on the GPU
(a counter written on the host would move its pages to the GPU inside the timed call). The
stamps cost a few registers, so times are near, not equal to, the unpatched kernel's (``bash
benchmarks/device_tc.sh ktimes``).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

OFFSET = 1024  # counter words before the stamps
POINTS = 8  # stamps per block; a ninth slot holds the SM
PHASES = ["setup", "loop", "partials", "counter", "merge_weights", "merge_rows", "rotate_out"]
_STAMP = r"""
  auto tq_stamp = [&](int k) {
    if (threadIdx.x == 0) {
      unsigned long long t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      unsigned long long* p = reinterpret_cast<unsigned long long*>(
          const_cast<uint32_t*>(counter) + OFFSET_WORDS) +
          ((size_t)(blockIdx.y * gridDim.x + blockIdx.x) * (POINTS + 1) + k) * 2;
      p[0] = t;
      p[1] = clock64();
      if (k == 0) {
        unsigned int sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        p[2 * POINTS] = sm;
      }
    }
  };
  tq_stamp(0);
""".replace("OFFSET_WORDS", str(OFFSET)).replace("POINTS", str(POINTS))
# (text the stamp follows, stamp): the kernel's barriers and hand-offs
_ANCHORS = [
    ("  constexpr int NWARPS = NT / 32;\n", _STAMP),
    ("  TQ_BARRIER();\n\n  // A fragments of the query", None),  # after the barrier
    ("  TQ_BARRIER();  // every warp is done with the tables\n", "  tq_stamp(2);\n"),
    ("  TQ_SHARED int last_sh;\n", "  tq_stamp(3);\n"),
    ("  TQ_BARRIER();\n  if (!last_sh) {", None),
    ("  TQ_BARRIER();\n  {\n", None),
    ("the value signs s.\n  TQ_BARRIER();\n", "  tq_stamp(6);\n"),
]


def stamped(body: str) -> str:
    """``source.ATTENTION_TC`` with the stamps; ValueError where an anchor is gone."""
    for k, (anchor, stamp) in enumerate(_ANCHORS):
        if body.count(anchor) != 1:
            raise ValueError(f"the kernel source has {body.count(anchor)} of anchor {k}: "
                             f"{anchor!r} (update benchmarks/kernel_timeline.py)")  # fmt: skip
        if stamp is None:  # right after the first line of the anchor (a barrier)
            head, tail = anchor.split("\n", 1)
            body = body.replace(anchor, f"{head}\n  tq_stamp({k});\n{tail}")
        else:
            body = body.replace(anchor, anchor + stamp)
    return body + f"  tq_stamp({POINTS - 1});\n"


def _patch():
    from mlx_lm_turboquant.kernels import launch, source

    body, ins, outs = source.OPS["attention_tc"]
    source.OPS["attention_tc"] = (stamped(body), ins, outs)
    plain = launch._chain
    launch._chain = lambda cache, n_blocks=0: plain(cache, 0)  # the probe sets the counter


def probe(scheme, T, calls=6):
    from bench_kernels import D, H_KV, H_Q, filled_cache

    from mlx_lm_turboquant import turboquant_sdpa
    from mlx_lm_turboquant.kernels import launch

    cache = filled_cache(scheme, T)
    q = mx.random.normal((1, H_Q, 1, D)).astype(mx.bfloat16)
    chain = launch._chain(cache)
    words = OFFSET + 2 * (POINTS + 1) * 4096
    counters = [mx.arange(words, dtype=mx.uint32) * 0 for _ in range(calls)]
    mx.eval(counters)
    for c in counters:
        chain.counter = c
        mx.eval(turboquant_sdpa(q, cache, D**-0.5))
    mx.synchronize()
    n_blocks = int(chain.fast[2]) * H_KV
    rows = [_call(np.array(c, copy=True), n_blocks, H_KV) for c in counters[1:]]
    out = {"scheme": scheme, "tokens": T}
    for key, value in rows[0].items():
        if key == "loop_by_blocks_on_sm":  # the last call's
            out[key] = rows[-1][key]
        elif isinstance(value, dict):
            out[key] = {k: statistics.median(r[key][k] for r in rows) for k in value}
        else:
            out[key] = statistics.median(r[key] for r in rows)
    return out


def _call(words, n_blocks, n_heads):
    st = words[OFFSET:].view(np.uint64).reshape(-1, POINTS + 1, 2)[:n_blocks].astype(np.int64)
    t, clk, sm = st[:, :POINTS, 0], st[:, :POINTS, 1], st[:, POINTS, 0]
    t0 = t[:, 0].min()
    last = t[:, 5] > t[:, 4]
    if last.sum() != n_heads:
        raise RuntimeError(f"{last.sum()} blocks merged, expected {n_heads}")
    r = {"blocks": n_blocks, "span_us": (t[last, 7].max() - t0) / 1e3}
    for k, name in ((1, "set_up_done"), (2, "loop_done"), (4, "counted_in")):
        r[name] = {f"p{q}": float(np.percentile(t[:, k] - t0, q)) / 1e3 for q in (10, 50, 90, 100)}
    per_sm = np.bincount(sm)
    shared = per_sm[sm]
    loop = (t[:, 2] - t[:, 1]) / 1e3
    r["loop_by_blocks_on_sm"] = {int(n): {"blocks": int((shared == n).sum()),
                                          "loop_us": float(np.median(loop[shared == n]))}
                                 for n in np.unique(shared)}  # fmt: skip
    for k, name in enumerate(PHASES):
        sel = last if k >= 4 else slice(None)
        dt, dc = (t[sel, k + 1] - t[sel, k]) / 1e3, clk[sel, k + 1] - clk[sel, k]
        r[name] = {"us_median": float(np.median(dt)), "us_max": float(dt.max()),
                   "clocks_median": float(np.median(dc))}  # fmt: skip
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--schemes", nargs="+", default=["turbo4"])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mlx_lm_turboquant

    mlx_lm_turboquant.activate()
    _patch()
    results = []
    for T in args.contexts:
        for scheme in args.schemes:
            r = probe(scheme, T)
            results.append(r)
            print(f"{scheme} at {T} tokens: {r['blocks']} blocks, first entry to last exit "
                  f"{r['span_us']:.1f} us")  # fmt: skip
            for name in ("set_up_done", "loop_done", "counted_in"):
                print(f"  {name:<12} " + "  ".join(f"{q} {v:6.2f}" for q, v in r[name].items()))
            print("  loop by blocks on the SM: " + ", ".join(
                f"{n}: {v['blocks']} blocks {v['loop_us']:.1f} us"
                for n, v in r["loop_by_blocks_on_sm"].items()))
            for name in PHASES:
                print(f"  {name:<14} median {r[name]['us_median']:6.2f} us  "
                      f"max {r[name]['us_max']:6.2f} us")
            mx.clear_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
