"""KL against bits per coordinate for every row of lever_study.py's JSON files.

    python benchmarks/plot_levers.py docs/results/levers/levers.json ... --out docs/results/levers/levers.png
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Lever -> marker colour; a row's lever is read from its config.
GROUPS = (
    ("window", "tab:purple"), ("key scale", "tab:olive"), ("shared rotation", "tab:brown"),
    ("mixed", "tab:red"), ("last", "tab:green"), ("first", "tab:green"), ("@!-1", "tab:green"),
)  # fmt: skip


def group(config):
    for key, colour in GROUPS:
        if key in config:
            return key if key not in ("first", "@!-1") else "last", colour
    return "uniform", "tab:blue"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="tq-llama-8k, prefill 768 + 256 teacher-forced steps, 4 windows")
    args = p.parse_args()
    rows = [r for f in args.inputs for r in json.loads(Path(f).read_text())["rows"]]
    fig, ax = plt.subplots(figsize=(10, 6.5))
    seen = set()
    for r in rows:
        name, colour = group(r["config"])
        ax.scatter(r["bits_per_coord"], r["kl_mean"], c=colour,
                   label=None if name in seen else name, s=28, zorder=3)  # fmt: skip
        seen.add(name)
        ax.annotate(r["config"], (r["bits_per_coord"], r["kl_mean"]), fontsize=6,
                    xytext=(3, 2), textcoords="offset points")  # fmt: skip
    for y, label in ((0.004, "turbo4 target KL"), (0.008, "turbo3 target KL")):
        ax.axhline(y, color="grey", ls=":", lw=1)
        ax.text(ax.get_xlim()[1], y, label, fontsize=7, ha="right", va="bottom", color="grey")
    for x, label in ((0.21 * 16, "0.21x"), (0.28 * 16, "0.28x")):
        ax.axvline(x, color="grey", ls="--", lw=1)
        ax.text(x, ax.get_ylim()[1], label, fontsize=7, ha="left", va="top", color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per coordinate (16 x KV bytes vs fp16; norms and fp16 parts included)")
    ax.set_ylabel("mean KL(fp16 || scheme), nats/token")
    ax.set_title(args.title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)


if __name__ == "__main__":
    main()
