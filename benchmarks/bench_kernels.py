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
from mlx_lm_turboquant.config import parse_scheme
from mlx_lm_turboquant.kernels.launch import TENSOR_CORES_ENV

H_Q, H_KV, D = 32, 8, 128
SCHEMES = ("turbo4", "turbo3", "turbo2", "turbo4v2", "turbo0v4")
L2_SPAN = 256 << 20  # rotate over copies until this many bytes, so reads come from HBM


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
    return p


def _time(fn, copies, repeats=15, inner=8):
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
                for _ in range(_n_copies(nbytes)):
                    c = TurboQuantKVCache(scheme)
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
    run; ``scheme:apart`` caches that keep four arrays instead of token rows."""
    variant = name.split(":")[1] if ":" in name else ""
    if variant not in ("", "portable", "apart"):
        raise ValueError(f"unknown kernel variant {variant!r} in {name!r}; "
                         "allowed: portable, apart")  # fmt: skip
    old = os.environ.get(TENSOR_CORES_ENV)
    if variant == "portable":
        os.environ[TENSOR_CORES_ENV] = "0"
    TurboQuantKVCache.packs_rows = variant != "apart"
    try:
        yield
    finally:
        TurboQuantKVCache.packs_rows = True
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
        rope_theta=500000.0, head_dim=128, tie_word_embeddings=False,
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
    cache = [KVCache() if kind == "fp16" else TurboQuantKVCache(kind, layer_index=i)
             for i in range(layers)]  # fmt: skip
    for c in cache:
        k = mx.random.normal((1, H_KV, T, D)).astype(mx.bfloat16)
        v = mx.random.normal((1, H_KV, T, D)).astype(mx.bfloat16)
        c.update_and_fetch(k, v)
        mx.eval(c.buffers() if kind != "fp16" else [c.keys, c.values])
    return cache


def decode_rate(model, cache, steps, rounds=3):
    """Decode tok/s (median of ``rounds``), pipelined like mlx-lm's generate_step (async_eval
    one step ahead), the host time per step spent building the graph, and peak memory."""
    host = [0.0]

    def step(y):
        t = time.perf_counter()
        out = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        host[0] += time.perf_counter() - t
        return out

    y = step(mx.array([1]))
    mx.eval(y)
    for _ in range(3):  # warm-up: kernel builds, allocator
        y = step(y)
        mx.eval(y)
    mx.reset_peak_memory()
    rates, hosts = [], []
    for _ in range(rounds):
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
        y = nxt
        rates.append(steps / (time.perf_counter() - t0))
        hosts.append(host[0] / steps)
        for c in cache:  # back to the same context length for the next round
            c.trim(steps)
    return statistics.median(rates), statistics.median(hosts), mx.get_peak_memory()


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
        mx.eval([a for c in cache for a in (c.buffers() if hasattr(c, "buffers")
                                            else (c.keys, c.values))])  # fmt: skip
        samples.append(time.perf_counter() - t0)
        for c in cache:
            c.trim(1)
    return statistics.median(samples[2:])


def e2e_bench(contexts, schemes, steps):
    model = llama8b()
    rows = []
    for T in contexts:
        row = {"context": T}
        for kind in ["fp16"] + list(schemes):
            try:
                with _kernel_variant(kind):
                    cache = _fill(model, kind.split(":")[0], T)
                    tps, host, peak = decode_rate(model, cache, steps)
                    enc = encode_cost(cache)
                row[kind] = {"tok_s": tps, "host_ms_per_step": host * 1e3, "peak_GB": peak / 1e9,
                             "encode_ms": enc * 1e3, "encode_share": enc * tps}  # fmt: skip
            except Exception as err:
                row[kind] = {"error": f"{type(err).__name__}: {err}"[:200]}
            cache = None
            mx.clear_cache()
        rows.append(row)
        fp = row["fp16"].get("tok_s", float("nan"))
        line = [f"{T:>6}"] + [
            f"{k} {r['tok_s']:.1f} tok/s host {r['host_ms_per_step']:.1f} ms {r['peak_GB']:.1f} GB "
            f"enc {r['encode_ms']:.2f} ms"
            + ("" if k == "fp16" else f" {r['tok_s'] / fp:.2f}x")
            if "tok_s" in r else f"{k} ERROR {r['error']}"
            for k, r in row.items() if k != "context"
        ]  # fmt: skip
        print(" | ".join(line), flush=True)
    return rows


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if result.get("e2e") else 1, figsize=(13, 4.5), squeeze=False)
    ax = axes[0][0]
    rows = result["kernels"]
    xs = [r["context"] for r in rows]
    for name in ["fp16_sdpa", "mlx_lm_affine4"] + result["schemes"]:
        ys = [r[name]["ms"] if "ms" in r.get(name, {}) else None for r in rows]
        if any(y is not None for y in ys):
            ax.plot([x for x, y in zip(xs, ys) if y], [y for y in ys if y], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decode attention",
           title=f"B=1, 32 q / 8 kv heads, D=128 ({result['device']})")  # fmt: skip
    ax.legend(fontsize=8)
    if result.get("e2e"):
        ax = axes[0][1]
        rows = result["e2e"]
        xs = [r["context"] for r in rows]
        for name in ["fp16"] + result["e2e_schemes"]:
            ys = [r[name].get("tok_s") for r in rows]
            ax.plot(xs, ys, marker="o", label=name)
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="decode tok/s",
               title="Llama-3-8B shape, random 4-bit weights")  # fmt: skip
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = setup_arg_parser().parse_args()
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
    if result["kernels"]:
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
