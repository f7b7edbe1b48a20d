"""``mlx-lm-turboquant eval {kld,niah,memory,calibrate} ...``: quality and memory of KV schemes
on any mlx-lm model, with progress bars, a markdown table on stdout, and JSON + PNG in ``--out``."""

import json
from pathlib import Path

from ..cli import command


def _schemes(text):
    from ..config import parse_scheme

    names = [s for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError(f"--schemes needs at least one scheme name, got {text!r}")
    return [parse_scheme(s) for s in names]


def _ints(text, what):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{what} must be positive integers, got {text!r}")
    return values


def _load(args):
    import mlx.core as mx
    from mlx_lm import load

    import mlx_lm_turboquant as tq

    tq.activate()
    model, tokenizer = load(args.model)
    if mx.default_device() == mx.cpu and not args.keep_dtype:
        model.set_dtype(mx.float32)  # mlx's CPU backend is slow in half precision
    return model, tokenizer


def _token_ids(args, tokenizer, needed):
    import numpy as np

    if args.ids:
        ids = np.load(args.ids)
    elif args.text:
        ids = np.array(tokenizer.encode(Path(args.text).read_text()), dtype=np.int32)
    else:
        raise ValueError("give --ids FILE.npy or --text FILE")
    if ids.ndim != 1 or len(ids) < needed:
        raise ValueError(f"need at least {needed} tokens of text, got {len(ids)}")
    return ids


def _common(p):
    p.add_argument("--model", required=True, help="mlx-lm model path")
    p.add_argument("--schemes", default="turbo4,turbo3", help="comma-separated schemes")
    p.add_argument("--layers", default=None, help="layer spec (default: $MLX_TQ_LAYERS or the scheme's)")
    p.add_argument("--out", default=None, help="folder for JSON and PNG results")
    p.add_argument("--keep-dtype", action="store_true", help="on CPU, do not cast the model to float32")


def _settings(args):
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def _write(out, name, payload):
    if out is None:
        return None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    return out


def _plot(path, draw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    draw(ax)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# -- kld -------------------------------------------------------------------------


def run_kld(args):
    from tqdm import tqdm

    from .kld import reference_run, teacher_forced_kl

    schemes = _schemes(args.schemes)
    contexts = _ints(args.contexts, "--contexts")
    model, tokenizer = _load(args)
    ids = _token_ids(args, tokenizer, max(contexts) + args.steps + 1)
    rows, sensitivity = [], []
    with tqdm(total=len(contexts) * (1 + len(schemes)), desc="kld", unit="run") as bar:
        for ctx in contexts:
            ref = reference_run(model, ids, ctx, args.steps)
            bar.update(1)
            for s in schemes:
                rows.append(teacher_forced_kl(model, ids, s, args.layers, ctx, args.steps, reference=ref).as_dict())
                bar.update(1)
            if args.sensitivity and ctx == contexts[0]:
                n = len(ref[1])  # cache entries = layers
                for s in schemes:
                    for layer in tqdm(range(n), desc=f"per-layer {s.name}", leave=False):
                        r = teacher_forced_kl(model, ids, s, str(layer), ctx, args.steps, reference=ref)
                        sensitivity.append({"scheme": s.name, "layer": layer, "kl_mean": r.kl_mean,
                                            "top1_agreement": r.top1_agreement})  # fmt: skip
    print("| scheme | context | mean KL | median KL | p99 KL | top-1 | ppl fp16 | ppl scheme | KV bytes vs fp16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['prefill']} | {r['kl_mean']:.5f} | {r['kl_median']:.5f} | "
              f"{r['kl_p99']:.4f} | {100 * r['top1_agreement']:.1f}% | {r['ppl_reference']:.3f} | "
              f"{r['ppl_compressed']:.3f} | {r['kv_bytes'] / r['kv_bytes_reference']:.3f}x |")  # fmt: skip
    if sensitivity:
        print("\n| scheme | layer compressed alone | mean KL | top-1 |\n|---|---|---|---|")
        for r in sensitivity:
            print(f"| {r['scheme']} | {r['layer']} | {r['kl_mean']:.5f} | {100 * r['top1_agreement']:.1f}% |")
    out = _write(args.out, "kld", {"args": _settings(args), "rows": rows, "sensitivity": sensitivity})
    if out is not None:
        def draw(ax):
            for s in schemes:
                pts = [(r["prefill"], r["kl_mean"]) for r in rows if r["scheme"] == s.name]
                ax.plot(*zip(*pts), marker="o", label=s.name)
            ax.set_xlabel("context (prefill tokens)")
            ax.set_ylabel("mean KL vs fp16 (nats/token)")
            ax.set_xscale("log", base=2)
            ax.legend()
        _plot(out / "kld.png", draw)
        if sensitivity:
            def draw_layers(ax):
                width = 0.8 / len(schemes)
                for k, s in enumerate(schemes):
                    pts = [(r["layer"], r["kl_mean"]) for r in sensitivity if r["scheme"] == s.name]
                    ax.bar([x + k * width for x, _ in pts], [y for _, y in pts], width, label=s.name)
                ax.set_xlabel("layer compressed alone")
                ax.set_ylabel("mean KL vs fp16 (nats/token)")
                ax.legend()
            _plot(out / "kld_layers.png", draw_layers)
    return 0


def _kld(p):
    _common(p)
    p.add_argument("--ids", default=None, help=".npy file of token ids")
    p.add_argument("--text", default=None, help="text file to tokenize instead of --ids")
    p.add_argument("--contexts", default="768", help="prefill lengths, comma-separated")
    p.add_argument("--steps", type=int, default=256, help="teacher-forced decode steps")
    p.add_argument("--sensitivity", action="store_true", help="also compress one layer at a time")
    return run_kld


# -- niah ------------------------------------------------------------------------


def run_niah(args):
    from tqdm import tqdm

    from .niah import against_first, markdown_tables, needle_in_haystack, plot_heatmaps

    schemes = _schemes(args.schemes)
    lengths = _ints(args.lengths, "--lengths")
    depths = [float(d) for d in args.depths.split(",")]
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths must lie in [0, 1], got {args.depths!r}")
    model, tokenizer = _load(args)
    ids = _token_ids(args, tokenizer, max(lengths) + 1)
    with tqdm(total=len(lengths) * len(depths) * args.trials, desc="niah", unit="prompt") as bar:
        results = needle_in_haystack(model, tokenizer, ids, schemes, lengths, depths, args.trials,
                                     args.seed, args.layers, progress=bar)  # fmt: skip
    # The same prompts ran through every cache: compare each scheme with fp16 pairwise.
    paired = against_first(results)
    print(markdown_tables(results, paired))
    out = _write(args.out, "niah", {"args": _settings(args), "paired": paired,
                                    "results": [r.as_dict() for r in results]})  # fmt: skip
    if out is not None:
        plot_heatmaps(results, out / "niah.png")
    return 0


def _niah(p):
    _common(p)
    p.add_argument("--ids", default=None, help=".npy file of token ids for the haystack")
    p.add_argument("--text", default=None, help="text file to tokenize instead of --ids")
    p.add_argument("--lengths", default="1024,2048,4096,8192", help="context lengths")
    p.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=5, help="prompts per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    return run_niah


# -- memory ----------------------------------------------------------------------


def run_memory(args):
    from tqdm import tqdm

    from .memory import prefill_peak_memory

    schemes = [None] + _schemes(args.schemes)
    contexts = _ints(args.contexts, "--contexts")
    model, tokenizer = _load(args)
    ids = _token_ids(args, tokenizer, max(contexts))
    rows = []
    for ctx in tqdm(contexts, desc="memory"):
        for s in schemes:
            rows.append(prefill_peak_memory(model, ids, s, ctx, args.chunk, args.layers).as_dict())
    print("| cache | context | KV bytes | peak memory | peak beyond weights |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['tokens']} | {r['kv_bytes'] / 2**20:.2f} MiB | "
              f"{r['peak_bytes'] / 2**20:.1f} MiB | {(r['peak_bytes'] - r['weights_bytes']) / 2**20:.1f} MiB |")  # fmt: skip
    out = _write(args.out, "memory", {"args": _settings(args), "rows": rows})
    if out is not None:
        def draw(ax):
            for name in dict.fromkeys(r["scheme"] for r in rows):
                pts = [(r["tokens"], r["kv_bytes"] / 2**20) for r in rows if r["scheme"] == name]
                ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("KV cache (MiB)")
            ax.legend()
        _plot(out / "memory.png", draw)
    return 0


def _memory(p):
    _common(p)
    p.add_argument("--ids", default=None, help=".npy file of token ids")
    p.add_argument("--text", default=None, help="text file to tokenize instead of --ids")
    p.add_argument("--contexts", default="1024,2048,4096", help="context lengths")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk size")
    return run_memory


def run_calibrate(args):
    import numpy as np
    from tqdm import tqdm

    from ..config import parse_scheme
    from .allocate import FP16, allocate, layer_costs, measure, plan_spec

    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    for f in formats:
        if f != FP16:
            parse_scheme(f)
    if not formats:
        raise ValueError(f"--formats needs at least one format, got {args.formats!r}")
    if not 0 < args.budget <= 1:
        raise ValueError(f"--budget is KV bytes as a share of fp16's, in (0, 1], got {args.budget}")
    windows = _ints(args.windows, "--windows")
    model, tokenizer = _load(args)
    span = args.prefill + args.steps + 1
    ids = _token_ids(args, tokenizer, span * max(windows))
    chunks = [ids[(w - 1) * span : w * span] for w in windows]
    total = sum(f != FP16 for f in formats) * len(model.layers)
    with tqdm(total=total, desc="calibrate", unit="layer") as bar:
        kl, cache = measure(model, chunks, formats, args.prefill, args.steps, progress=bar)
    cost = layer_costs(cache, formats)
    fp16 = sum(layer_costs(cache, [FP16])[FP16])
    plan = allocate(kl, cost, int(args.budget * fp16))
    spec = plan_spec(plan)
    used = sum(cost[f][i] for i, f in enumerate(plan))
    predicted = float(np.sum([kl[f][i] for i, f in enumerate(plan)]))
    print(f"plan: {spec}\nKV bytes {used / fp16:.3f}x fp16 ({16 * used / fp16:.2f} bits/coord), "
          f"predicted KL {predicted:.5f} (sum of single-layer KLs)")  # fmt: skip
    _write(args.out, "plan", {"layers": spec, "formats": plan, "bytes_ratio": used / fp16,
                              "predicted_kl": predicted, "sensitivity": kl,
                              "args": _settings(args)})  # fmt: skip
    return 0


def _calibrate(p):
    _common(p)
    p.add_argument("--ids", default=None, help=".npy file of token ids")
    p.add_argument("--text", default=None, help="text file to tokenize instead of --ids")
    p.add_argument("--formats", default="turbo3,turbo4v3,turbo4,turbo8v4",
                   help="formats a layer may get (scheme names, or fp16)")
    p.add_argument("--budget", type=float, default=0.28, help="KV bytes as a fraction of fp16's")
    p.add_argument("--prefill", type=int, default=768)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--windows", default="1,2", help="which consecutive spans of the ids to use")
    return run_calibrate


TOOLS = {
    "kld": (_kld, "teacher-forced KL divergence and top-1 agreement against the fp16 cache"),
    "niah": (_niah, "needle-in-a-haystack retrieval, fp16 against each scheme, with a heatmap"),
    "memory": (_memory, "KV bytes and peak memory of a prefill, per scheme and context length"),
    "calibrate": (_calibrate, "bits per layer from measured sensitivity: a layer plan (plan.json) "
                              "for a KV size budget"),
}


@command("eval", help="quality and memory of KV schemes: kld, niah, memory, calibrate")
def _eval(parser):
    sub = parser.add_subparsers(dest="tool", metavar="TOOL", required=True)
    for name, (setup, help) in TOOLS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(_tool=setup(p))

    def run(args):
        try:
            return args._tool(args)
        except ValueError as e:
            parser.error(str(e))

    return run
