"""Decode-attention and end-to-end decode benchmark: fp16 cache vs TurboQuant schemes.

Kernel level (B=1, 32 query heads, 8 KV heads, D=128, bf16, one query token): mlx's
``mx.fast.scaled_dot_product_attention``, mlx-lm's affine 4-bit quantized attention
(recorded as failing where it does not run) and each turbo scheme; time per call and the
bandwidth achieved on the bytes each one actually reads. End to end: a Llama-3-8B-shaped
model with random 4-bit weights, decode tok/s and peak memory at several contexts, with
the cache filled by random tokens (no prefill: it would only cost time here), plus the
cost of encoding one new token in every layer.

    python benchmarks/bench_kernels.py --out results/           # table, JSON, PNG
    python benchmarks/bench_kernels.py --skip-e2e --contexts 1024 4096
"""

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

import mlx_lm_turboquant
from mlx_lm_turboquant import TurboQuantKVCache, kernels, turboquant_sdpa
from mlx_lm_turboquant.codec.centring import RopeFrame
from mlx_lm_turboquant.config import parse_scheme
from mlx_lm_turboquant.kernels.launch import TENSOR_CORES_ENV

H_Q, H_KV, D = 32, 8, 128
SCHEMES = ("turbo4", "turbo3", "turbo2", "turbo4v2", "turbo0v4")
L2_SPAN = 256 << 20  # rotate over copies until this many bytes, so reads come from HBM
ROPE_BASE = 500000.0  # Llama 3's: the frame of centred (c) schemes


def bench_cache(scheme, layer_index=0):
    """A cache of ``scheme`` for the benchmark's heads; a ``c`` scheme centres in the
    RoPE frame of the Llama-3-shaped model."""
    frame = RopeFrame.standard(D, ROPE_BASE) if parse_scheme(scheme).centre_keys else None
    return TurboQuantKVCache(scheme, layer_index=layer_index, rope_frame=frame)


def filled_cache(scheme, tokens):
    """``bench_cache(scheme)`` holding ``tokens`` random bf16 tokens per KV head (batch 1),
    appended 8192 at a time: bounded temporary memory."""
    cache = bench_cache(scheme)
    for start in range(0, tokens, 8192):
        k = mx.random.normal((1, H_KV, min(8192, tokens - start), D)).astype(mx.bfloat16)
        cache.update_and_fetch(k, k)
        mx.eval(cache.keys, cache.values)
    return cache


def setup_arg_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 131072]
    )
    p.add_argument("--e2e-contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    p.add_argument("--e2e-schemes", nargs="+", default=["turbo4", "turbo3", "turbo2"])
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--decode-steps", type=int, default=48)
    p.add_argument("--sweep-blocks", type=int, nargs="*", default=[],
                   help="also time turbo4 at every context for these TARGET_BLOCKS")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--merge", nargs="+", metavar="BENCH_JSON",
                   help="only merge these runs' end-to-end rows into one JSON and plot")
    return p


INNER = 8  # calls per timed sample


def _time(fn, copies, repeats=15, inner=INNER):
    """Median seconds per call; each sample evaluates ``inner`` calls over rotating copies."""
    for i in range(3):
        mx.eval(fn(copies[i % len(copies)]))
    samples = []
    for r in range(repeats):
        outs = [fn(copies[(r * inner + i) % len(copies)]) for i in range(inner)]
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def measure_bandwidth():
    """Bytes per second of ``x + 1`` over 1 GiB (read + write), as the copy ceiling."""
    x = mx.random.normal((256 << 20,)).astype(mx.float32)
    mx.eval(x)
    t = _time(lambda a: a + 1, [x], repeats=10, inner=2)
    return 2 * x.nbytes / t


def _n_copies(nbytes):
    return max(1, min(64, math.ceil(L2_SPAN / max(nbytes, 1))))


def kernel_bench(contexts, schemes, baselines=True):
    rows = []
    q = mx.random.normal((1, H_Q, 1, D)).astype(mx.bfloat16)
    scale = D**-0.5
    for T in contexts:
        row = {"context": T}
        kv_bytes = 2 * H_KV * T * D * 2
        if not baselines:
            row["fp16_sdpa"] = row["mlx_lm_affine4"] = {"error": "not measured"}
        copies = [] if baselines else [None]
        for _ in range(_n_copies(kv_bytes)):
            k = mx.random.normal((1, H_KV, T, D)).astype(mx.bfloat16)
            v = mx.random.normal((1, H_KV, T, D)).astype(mx.bfloat16)
            mx.eval(k, v)
            copies.append((k, v))
        if baselines:
            sdpa = mx.fast.scaled_dot_product_attention
            t = _time(lambda kv: sdpa(q, kv[0], kv[1], scale=scale), copies)
            row["fp16_sdpa"] = {"ms": t * 1e3, "bytes": kv_bytes, "GBps": kv_bytes / t / 1e9}

        from mlx_lm.models.base import quantized_scaled_dot_product_attention

        try:
            if not baselines:
                raise RuntimeError("not measured")
            qk = [(mx.quantize(k, group_size=64, bits=4), mx.quantize(v, group_size=64, bits=4))
                  for k, v in copies]  # fmt: skip
            qbytes = sum(a.nbytes for a in qk[0][0]) + sum(a.nbytes for a in qk[0][1])
            t = _time(lambda kv: quantized_scaled_dot_product_attention(
                q, kv[0], kv[1], scale=scale, mask=None, group_size=64, bits=4), qk)  # fmt: skip
            row["mlx_lm_affine4"] = {"ms": t * 1e3, "bytes": qbytes, "GBps": qbytes / t / 1e9}
        except Exception as err:  # recorded, not fatal: mlx has no CUDA quantized_matmul here
            row["mlx_lm_affine4"] = {"error": f"{type(err).__name__}: {err}"[:200]}
        del copies
        mx.clear_cache()

        for name in schemes:
            scheme = parse_scheme(name.split(":")[0])
            nbytes = scheme.bytes_per_token(H_KV, D) * T
            caches = []
            with _kernel_variant(name):
                # A cache per call of a sample: launches on one cache run one after another
                # (the tensor-core kernel's merge counter), as the baselines' calls need not.
                for _ in range(max(INNER, _n_copies(nbytes))):
                    c = bench_cache(scheme)
                    k = mx.random.normal((1, H_KV, T, D)).astype(mx.bfloat16)
                    v = mx.random.normal((1, H_KV, T, D)).astype(mx.bfloat16)
                    c.update_and_fetch(k, v)
                    mx.eval(c.buffers())
                    caches.append(c)
                t = _time(lambda c: turboquant_sdpa(q, c, scale), caches)
            row[name] = {"ms": t * 1e3, "bytes": nbytes, "GBps": nbytes / t / 1e9}
            del caches
            mx.clear_cache()
        rows.append(row)
        if baselines:
            print(_kernel_line(row, schemes), flush=True)
    return rows


@contextlib.contextmanager
def _kernel_variant(name):
    """``scheme:portable`` measures the portable kernel where CUDA's tensor-core one would
    run; ``scheme:apart`` caches that keep four arrays instead of token rows;
    ``scheme:uncompiled`` the CUDA launches built per call instead of replayed from
    ``mx.compile`` graphs; on sm_90 and later, ``scheme:loads`` the tensor-core kernel
    with loads of its token rows and wide table rows instead of bulk copies, and
    ``scheme:narrow`` with loads and narrow table rows (what other GPUs get), and
    ``scheme:bulkN`` with bulk copies N steps ahead (for any size of token rows);
    ``scheme:blocksN`` about N blocks per attention call for every build
    (``launch.TARGET_BLOCKS``, and none of them takes fewer: ``FEWER_BLOCKS_SHARE``).
    Several join with ``+``: ``turbo4:bulk3+blocks264``."""
    from mlx_lm_turboquant.kernels import cuda, launch

    variants = name.split(":")[1].split("+") if ":" in name else []
    allowed = ("portable", "apart", "uncompiled", "loads", "narrow")
    numbered = {"bulk": 2, "blocks": 1}  # prefix: least N
    number = {}
    for v in variants:
        prefix = next((k for k in numbered if v.startswith(k)), None)
        n = v[len(prefix):] if prefix else ""
        if prefix and n.isdigit() and int(n) >= numbered[prefix]:
            number[prefix] = int(n)
        elif v not in allowed:
            raise ValueError(f"unknown kernel variant {v!r} in {name!r}; allowed: "
                             f"{', '.join(allowed)}, bulkN (N >= 2), blocksN (N >= 1), "
                             "joined with +")  # fmt: skip
    old = os.environ.get(TENSOR_CORES_ENV)
    if "portable" in variants:
        os.environ[TENSOR_CORES_ENV] = "0"
    TurboQuantKVCache.packs_rows = "apart" not in variants
    cuda.COMPILED = "uncompiled" not in variants
    wide_bytes = cuda.wide_bytes
    if "narrow" in variants:
        cuda.wide_bytes = lambda: 0
    launch.BULK_COPIES = not {"loads", "narrow"} & set(variants)
    bulk_steps, min_bytes, blocks = launch.BULK_STEPS, launch.BULK_MIN_BYTES, launch.TARGET_BLOCKS
    share = launch.FEWER_BLOCKS_SHARE
    if "bulk" in number:
        launch.BULK_STEPS, launch.BULK_MIN_BYTES = number["bulk"], 0
    launch.TARGET_BLOCKS = number.get("blocks", blocks)
    if "blocks" in number:
        launch.FEWER_BLOCKS_SHARE = (1, 1)
    try:
        yield
    finally:
        TurboQuantKVCache.packs_rows = True
        cuda.COMPILED = True
        cuda.wide_bytes = wide_bytes
        launch.BULK_COPIES = True
        launch.BULK_STEPS, launch.BULK_MIN_BYTES = bulk_steps, min_bytes
        launch.TARGET_BLOCKS, launch.FEWER_BLOCKS_SHARE = blocks, share
        os.environ.pop(TENSOR_CORES_ENV, None)
        if old is not None:
            os.environ[TENSOR_CORES_ENV] = old


def _kernel_line(row, schemes):
    fp = row["fp16_sdpa"]["ms"]
    parts = [f"{row['context']:>7}", f"fp16 {fp:.3f} ms {row['fp16_sdpa']['GBps']:.0f} GB/s"]
    a = row["mlx_lm_affine4"]
    parts.append("affine4 fails" if "error" in a else f"affine4 {a['ms']:.3f} ms")
    for s in schemes:
        r = row[s]
        parts.append(f"{s} {r['ms']:.3f} ms {r['GBps']:.0f} GB/s {fp / r['ms']:.2f}x")
    return " | ".join(parts)


def llama8b(quantized=True):
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=128256,
        rope_theta=ROPE_BASE, head_dim=128, tie_word_embeddings=False,
    )  # fmt: skip
    model = llama.Model(args)
    model.set_dtype(mx.bfloat16)
    if quantized:
        nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def _fill(model, kind, T):
    from mlx_lm.models.cache import KVCache

    layers = len(model.layers)
    cache = [KVCache() if kind == "fp16" else bench_cache(kind, layer_index=i)
             for i in range(layers)]  # fmt: skip
    for c in cache:
        k = mx.random.normal((1, H_KV, T, D)).astype(mx.bfloat16)
        v = mx.random.normal((1, H_KV, T, D)).astype(mx.bfloat16)
        c.update_and_fetch(k, v)
        mx.eval(_arrays(c))
    return cache


def next_token(model, cache, y):
    """One greedy decode step: the tokens ``y`` ``[B]`` in, the next tokens out (lazy)."""
    return mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)


def decode_rate(model, cache, steps):
    """One round: decode tok/s pipelined like mlx-lm's generate_step (async_eval one step
    ahead) and the host time per step spent building the graph. The cache is trimmed back
    to its length afterwards."""
    host = [0.0]

    def step(y):
        t = time.perf_counter()
        out = next_token(model, cache, y)
        host[0] += time.perf_counter() - t
        return out

    y = step(mx.array([1]))
    mx.eval(y)
    for _ in range(3):  # warm-up: kernel builds, allocator
        y = step(y)
        mx.eval(y)
    host[0] = 0.0
    mx.synchronize()
    t0 = time.perf_counter()
    nxt = step(y)
    mx.async_eval(nxt)
    for _ in range(steps - 1):
        y, nxt = nxt, step(nxt)
        mx.async_eval(nxt)
        y.item()
    nxt.item()
    rate = steps / (time.perf_counter() - t0)
    for c in cache:  # back to the same context length for the next round
        c.trim(steps + 4)
    return rate, host[0] / steps


def encode_cost(cache, repeats=10):
    """Seconds to append one token's keys and values to every layer's cache."""
    k = mx.random.normal((1, H_KV, 1, D)).astype(mx.bfloat16)
    v = mx.random.normal((1, H_KV, 1, D)).astype(mx.bfloat16)
    samples = []
    for _ in range(repeats + 2):
        mx.synchronize()
        t0 = time.perf_counter()
        for c in cache:
            c.update_and_fetch(k, v)
        mx.eval([a for c in cache for a in _written(c)])
        samples.append(time.perf_counter() - t0)
        for c in cache:
            c.trim(1)
    return statistics.median(samples[2:])


def e2e_bench(contexts, schemes, steps, rounds=5):
    """Every cache of a context stays in memory and the rounds alternate between them
    (fp16, scheme, scheme, ..., fp16, ...), so a drift of the machine over the run (clocks,
    other tenants) reaches each one alike; a ratio to fp16 is the median of the rounds'
    ratios."""
    model = llama8b()
    rows = []
    for T in contexts:
        row, caches = {"context": T}, {}
        kinds = ["fp16"] + list(schemes)
        for kind in kinds:
            try:
                with _kernel_variant(kind):
                    caches[kind] = _fill(model, kind.split(":")[0], T)
            except Exception as err:
                row[kind] = {"error": f"{type(err).__name__}: {err}"[:200]}
        rates = {k: [] for k in caches}
        hosts = {k: [] for k in caches}
        peaks = {k: 0 for k in caches}
        for _ in range(rounds):
            for kind in list(caches):
                try:
                    mx.reset_peak_memory()
                    with _kernel_variant(kind):
                        rate, host = decode_rate(model, caches[kind], steps)
                    rates[kind].append(rate)
                    hosts[kind].append(host)
                    # Peak with this cache alone: the other caches' bytes sat idle in memory.
                    others = sum(_nbytes(c) for k in caches if k != kind for c in caches[k])
                    peaks[kind] = max(peaks[kind], mx.get_peak_memory() - others)
                except Exception as err:
                    row[kind] = {"error": f"{type(err).__name__}: {err}"[:200]}
                    del caches[kind]
        for kind in caches:
            held = sum(_nbytes(c) for c in caches[kind])
            with _kernel_variant(kind):
                enc = encode_cost(caches[kind])
            tps = statistics.median(rates[kind])
            ratios = [r / f for r, f in zip(rates[kind], rates.get("fp16", []))]
            row[kind] = {"tok_s": tps, "tok_s_rounds": rates[kind],
                         "host_ms_per_step": statistics.median(hosts[kind]) * 1e3,
                         "kv_GB": held / 1e9, "peak_GB": peaks[kind] / 1e9,
                         "encode_ms": enc * 1e3, "encode_share": enc * tps,
                         "vs_fp16": statistics.median(ratios) if ratios else None}  # fmt: skip
        caches = None
        mx.clear_cache()
        rows.append(row)
        line = [f"{T:>6}"] + [
            f"{k} {r['tok_s']:.1f} tok/s host {r['host_ms_per_step']:.1f} ms "
            f"KV {r['kv_GB']:.2f} GB peak {r['peak_GB']:.1f} GB enc {r['encode_ms']:.2f} ms"
            + ("" if k == "fp16" else f" {r['vs_fp16']:.2f}x")
            if "tok_s" in r else f"{k} ERROR {r['error']}"
            for k, r in row.items() if k in kinds
        ]  # fmt: skip
        print(" | ".join(line), flush=True)
    return rows


def _arrays(cache):
    """The arrays a layer's cache holds: mlx-lm's KVCache or a TurboQuant cache."""
    return cache.buffers() if hasattr(cache, "buffers") else [cache.keys, cache.values]


def _written(cache):
    """What an append wrote, to wait for: a TurboQuant cache's rows written in place (the
    launch's ``done``; reading ``buffers()`` would make its next append copy them)."""
    pending = getattr(cache, "_pending", None)
    return [pending] if pending is not None else _arrays(cache)


def _nbytes(cache):
    return sum(a.nbytes for a in _arrays(cache))


def plot(result, path):
    """Kernel times against context (when measured) and end-to-end decode: tok/s, and each
    scheme's ratio to fp16 (median of the alternating rounds) with the 1.0 line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (["kernels"] if result.get("kernels") else []) + (["e2e"] if result.get("e2e") else [])
    n = len(panels) + (1 if "e2e" in panels else 0)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.5), squeeze=False)
    axes = list(axes[0])
    if "kernels" in panels:
        ax = axes.pop(0)
        rows = result["kernels"]
        xs = [r["context"] for r in rows]
        for name in ["fp16_sdpa", "mlx_lm_affine4"] + result["schemes"]:
            ys = [r[name]["ms"] if "ms" in r.get(name, {}) else None for r in rows]
            if any(y is not None for y in ys):
                ax.plot([x for x, y in zip(xs, ys) if y], [y for y in ys if y], marker="o",
                        label=name)  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)",
               ylabel="ms per decode attention",
               title=f"B=1, 32 q / 8 kv heads, D=128 ({result['device']})")  # fmt: skip
        ax.legend(fontsize=8)
    if "e2e" in panels:
        rows = result["e2e"]
        xs = [r["context"] for r in rows]
        rate_ax, ratio_ax = axes
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, name in enumerate(["fp16"] + result["e2e_schemes"]):
            pts = [(x, r[name]) for x, r in zip(xs, rows) if "tok_s" in r.get(name, {})]
            style = dict(marker="o", label=name, color=colors[i % len(colors)])
            rate_ax.plot([x for x, _ in pts], [v["tok_s"] for _, v in pts], **style)
            if name != "fp16":
                ratio_ax.plot([x for x, _ in pts], [v["vs_fp16"] for _, v in pts], **style)
        runs = result.get("merged_runs", 1)
        rate_ax.set(xscale="log", xlabel="context (tokens)", ylabel="decode tok/s",
                    title="Llama-3-8B shape, random 4-bit weights, B=1"
                    + (f" ({runs} runs: hosts differ)" if runs > 1 else ""))  # fmt: skip
        ratio_ax.axhline(1.0, color="grey", lw=1, ls="--")
        ratio_ax.set(xscale="log", xlabel="context (tokens)", ylabel="decode tok/s / fp16",
                     title="against the fp16 cache in the same run (rounds alternate)")  # fmt: skip
        rate_ax.legend(fontsize=8)
        ratio_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge_e2e(paths):
    """One result from several runs' bench.json (their end-to-end rows, by context)."""
    merged = None
    for p in paths:
        result = json.loads(Path(p).read_text())
        if merged is None:
            merged = dict(result, kernels=[], e2e=[])
        common = [s for s in merged["e2e_schemes"] if s in result["e2e_schemes"]]
        merged["e2e_schemes"] = common
        merged["e2e"].extend(result.get("e2e", []))
    merged["e2e"].sort(key=lambda r: r["context"])
    merged["merged_runs"] = len(paths)
    return merged


def main():
    args = setup_arg_parser().parse_args()
    if args.merge:
        out = Path(args.out)
        result = merge_e2e(args.merge)
        (out / "e2e_merged.json").write_text(json.dumps(result, indent=1))
        plot(result, out / "e2e_merged.png")
        print(f"wrote {out / 'e2e_merged.json'} and {out / 'e2e_merged.png'}")
        return
    mlx_lm_turboquant.activate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = kernels.active_backend()
    result = {
        "device": str(mx.default_device()),
        "gpu": _gpu_name(),
        "mlx": mx.__version__,
        "kernels": [],
        "kernel_backend": None if backend is None else backend.NAME,
        "schemes": args.schemes,
        "e2e_schemes": args.e2e_schemes,
        "host": platform.node(),
    }
    result["copy_GBps"] = measure_bandwidth() / 1e9
    print(f"device {result['gpu']} mlx {mx.__version__} kernels {result['kernel_backend']} "
          f"copy bandwidth {result['copy_GBps']:.0f} GB/s", flush=True)  # fmt: skip
    if not args.skip_kernels:
        result["kernels"] = kernel_bench(args.contexts, args.schemes)
        (out / "bench.json").write_text(json.dumps(result, indent=1))
    if args.sweep_blocks:
        from mlx_lm_turboquant.kernels import launch

        default, result["block_sweep"] = launch.TARGET_BLOCKS, {}
        for n in args.sweep_blocks:
            launch.TARGET_BLOCKS = n
            rows = kernel_bench(args.contexts, ["turbo4"], baselines=False)
            result["block_sweep"][n] = {r["context"]: r["turbo4"]["ms"] for r in rows}
        launch.TARGET_BLOCKS = default
        print("blocks sweep (ms):", result["block_sweep"], flush=True)
    if not args.skip_e2e:
        result["e2e"] = e2e_bench(args.e2e_contexts, args.e2e_schemes, args.decode_steps)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    if result["kernels"] or result.get("e2e"):
        plot(result, out / "bench.png")


def _gpu_name():
    try:
        import subprocess

        cmd = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return platform.processor()


if __name__ == "__main__":
    main()
