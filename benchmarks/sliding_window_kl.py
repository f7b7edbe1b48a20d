"""Teacher-forced KL of a compressed sliding window on tq-llama-8k (docs/models.md).

tq-llama-8k is a full-attention model; here every layer is given a sliding window of
``--window`` tokens instead, once as mlx-lm's RotatingKVCache (the reference, model
dtype) and once as RotatingTurboQuantKVCache, and both see the same tokens: a prefill,
then single teacher-forced steps well past the window, so the compressed buffer wraps
around many times. Prints JSON (and writes it with ``--out``).

    python benchmarks/sliding_window_kl.py --out docs/results/sliding/sliding_kl.json
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.models.cache import KVCache, RotatingKVCache

import mlx_lm_turboquant
from mlx_lm_turboquant import RotatingTurboQuantKVCache, TurboQuantKVCache
from mlx_lm_turboquant.eval.kld import step_logprobs, teacher_forced_kl

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT.parent / "shared" / "models" / "tq-llama-8k"
IDS = ROOT.parent / "shared" / "data" / "tq-llama-val-ids.npy"


def sliding(model, window, scheme=None, plain_layers=()):
    n = len(model.layers)
    return [RotatingKVCache(window) if scheme is None or i in plain_layers
            else RotatingTurboQuantKVCache(scheme, i, max_size=window) for i in range(n)]  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--steps", type=int, default=768)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    mlx_lm_turboquant.activate()
    model, _ = load(str(MODEL))
    model.set_dtype(mx.float32)
    ids = np.load(IDS)
    n = len(model.layers)
    rows = []

    def run(label, make, make_reference):
        reference_cache = make_reference()
        ref = reference_run_with(model, ids, reference_cache, args)
        r = teacher_forced_kl(model, ids, "turbo4", prefill=args.prefill, steps=args.steps,
                              reference=ref, cache=make())  # fmt: skip
        row = dict(case=label, window=args.window, prefill=args.prefill, steps=args.steps,
                   kl_mean=r.kl_mean, kl_median=r.kl_median, kl_p99=r.kl_p99,
                   top1_agreement=r.top1_agreement, ppl_reference=r.ppl_reference,
                   ppl_compressed=r.ppl_compressed, kv_bytes=r.kv_bytes,
                   kv_bytes_reference=r.kv_bytes_reference)  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)

    W = args.window
    run("sliding window, turbo4 on all layers", lambda: sliding(model, W, "turbo4"),
        lambda: sliding(model, W))
    run("sliding window, turbo4 on all but the last layer",
        lambda: sliding(model, W, "turbo4", plain_layers=(n - 1,)), lambda: sliding(model, W))
    run("full attention (for comparison), turbo4 on all layers",
        lambda: [TurboQuantKVCache("turbo4", i) for i in range(n)],
        lambda: [KVCache() for _ in range(n)])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


def reference_run_with(model, ids, cache, args):
    """Like ``eval.kld.reference_run``, on a given cache list instead of the default one."""
    logprobs = step_logprobs(model, ids, cache, args.prefill, args.steps)
    mx.eval(logprobs)
    return logprobs, cache

if __name__ == "__main__":
    main()
