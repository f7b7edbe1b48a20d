"""Library-path quality of scheme / layer-spec candidates over several windows of the
validation ids: teacher-forced KL, top-1 agreement and KV bytes against the fp16 cache
(CPU, float32 model).

    python benchmarks/window_candidates.py --prefill 768 --offsets 0,50000,100000,150000 \
        turbo3.5w16: "turbo3v2w8:-1=turbo8v3"

Each candidate is SCHEME:LAYERS; an empty LAYERS means the default layer spec.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import mlx_lm_turboquant as tq  # noqa: E402
from mlx_lm_turboquant.eval.kld import reference_run, teacher_forced_kl  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("candidates", nargs="+", help="SCHEME:LAYERS")
    p.add_argument("--model", default=str(ROOT.parent / "shared/models/tq-llama-8k"))
    p.add_argument("--ids", default=str(ROOT.parent / "shared/data/tq-llama-val-ids.npy"))
    p.add_argument("--prefill", type=int, default=768)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--offsets", default="0,50000,100000,150000", help="window starts in the ids")
    args = p.parse_args()
    from mlx_lm import load

    tq.activate()
    model, _ = load(args.model)
    model.set_dtype(mx.float32)
    ids = np.load(args.ids)
    candidates = [c.partition(":")[::2] for c in args.candidates]
    rows = {}
    for offset in (int(x) for x in args.offsets.split(",")):
        window = ids[offset : offset + args.prefill + args.steps + 1]
        ref = reference_run(model, window, args.prefill, args.steps)
        for scheme, layers in candidates:
            r = teacher_forced_kl(model, window, scheme, layers or None, args.prefill, args.steps,
                                  reference=ref)  # fmt: skip
            row = (r.kl_mean, r.top1_agreement, r.kv_bytes / r.kv_bytes_reference)
            rows.setdefault(f"{scheme}@{layers}", []).append(row)
            print(offset, scheme, layers, "KL %.5f top-1 %.3f bytes %.4fx" % row, flush=True)
    print("| candidate | mean KL | top-1 | KV bytes vs fp16 |\n|---|---|---|---|")
    for name, values in rows.items():
        kl, top1, ratio = np.mean(values, axis=0)
        print(f"| {name} | {kl:.5f} | {top1:.1%} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
