"""Which layers to compress: teacher-forced KL against the uncompressed cache on
tq-llama-8k, over several windows of the validation ids.

    python benchmarks/layer_study.py --out benchmarks/results/layer_study.json \
        turbo4@all turbo4@!-1 turbo4@!0 turbo4@1:-1 turbo4-nonc@all turbo3@all turbo0v4@all

Each config is SCHEME@LAYERS (a "-nonc" suffix turns norm correction off), or a
comma-separated list with one scheme per layer ("fp16" keeps a layer uncompressed), e.g.
turbo4,turbo4,turbo4,turbo4,turbo4,turbo8v4. Prints a markdown table and writes JSON.
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="SCHEME@LAYERS, e.g. turbo4@all, turbo4@!-1, turbo4@")
    p.add_argument("--model", default=str(ROOT.parent / "shared/models/tq-llama-8k"))
    p.add_argument("--ids", default=str(ROOT.parent / "shared/data/tq-llama-val-ids.npy"))
    p.add_argument("--offsets", default="0,50000,100000,150000", help="window starts in the ids")
    p.add_argument("--prefill", type=int, default=768)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args()

    from mlx_lm import load

    import mlx_lm_turboquant as tq
    from mlx_lm.models.cache import KVCache

    from mlx_lm_turboquant.eval.kld import reference_run, teacher_forced_kl

    tq.activate()
    model, _ = load(args.model)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    ids = np.load(args.ids)
    offsets = [int(o) for o in args.offsets.split(",")]
    refs = [reference_run(model, ids[o:], args.prefill, args.steps) for o in tqdm(offsets, desc="fp16 runs")]

    rows = []
    for config in tqdm(args.configs, desc="configs"):
        if "," in config and "@" not in config:
            per_layer = config.split(",")
            if len(per_layer) != len(model.layers):
                raise ValueError(f"{config!r} names {len(per_layer)} layers; the model has {len(model.layers)}")
            cache = lambda: [KVCache() if s == "fp16" else tq.TurboQuantKVCache(s, i)  # noqa: E731
                             for i, s in enumerate(per_layer)]  # fmt: skip
            scheme, layers = None, None
        else:
            name, _, layers = config.partition("@")
            base = tq.parse_scheme(name.removesuffix("-nonc"))
            nc = not name.endswith("-nonc")
            scheme = replace(base, norm_correction=nc)
            cache = None
        results = [
            teacher_forced_kl(model, ids[o:], scheme, layers or None, args.prefill, args.steps,
                              reference=r, cache=cache() if cache else None)  # fmt: skip
            for o, r in zip(offsets, refs)
        ]
        rows.append({
            "config": config,
            "kl_mean": float(np.mean([r.kl_mean for r in results])),
            "top1": float(np.mean([r.top1_agreement for r in results])),
            "kv_bytes_vs_fp16": results[0].kv_bytes / results[0].kv_bytes_reference,
            "windows": [r.as_dict() for r in results],
        })  # fmt: skip

    print(f"\n| config | mean KL (nats/token) | KL per window | top-1 agreement | KV bytes vs fp16 |")
    print("|---|---|---|---|---|")
    for r in rows:
        per = ", ".join(f"{w['kl_mean']:.4f}" for w in r["windows"])
        print(f"| {r['config']} | {r['kl_mean']:.4f} | {per} | {100 * r['top1']:.1f}% | {r['kv_bytes_vs_fp16']:.3f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
