"""Join ``eval niah`` runs made one context length at a time (as the GPU's 10-minute calls
need) into one result: a table per length and overall, the paired comparison with fp16,
one JSON and one heatmap.

    python benchmarks/combine_niah.py docs/results/niah8k/niah_*.json --out docs/results/niah8k
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlx_lm_turboquant.eval.niah import (  # noqa: E402
    NeedleResult, against_first, markdown_tables, plot_heatmaps,
)


def combine(paths):
    runs = [json.loads(Path(p).read_text())["results"] for p in paths]
    runs.sort(key=lambda rs: rs[0]["lengths"][0])
    combined = []
    for per_scheme in zip(*runs):
        first = per_scheme[0]
        names = {r["scheme"] for r in per_scheme}
        if len(names) != 1 or any(r["depths"] != first["depths"] or r["trials"] != first["trials"]
                                  for r in per_scheme):  # fmt: skip
            raise ValueError(f"runs differ in schemes, depths or trials: {sorted(names)}")
        lengths = [n for r in per_scheme for n in r["lengths"]]
        hits = [[h for r in per_scheme for h in r["hits"][d]] for d in range(len(first["depths"]))]
        answers = [a for r in per_scheme for a in r["answers"]]
        combined.append(NeedleResult(first["scheme"], lengths, first["depths"], first["trials"],
                                     hits, answers))  # fmt: skip
    return combined


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="niah.json files, one or more lengths each")
    p.add_argument("--out", required=True, help="folder for niah.json and niah.png")
    args = p.parse_args()
    results = combine(args.files)
    paired = against_first(results)
    print(markdown_tables(results, paired))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"sources": args.files, "paired": paired, "results": [r.as_dict() for r in results]}
    (out / "niah.json").write_text(json.dumps(payload, indent=1))
    plot_heatmaps(results, out / "niah.png")


if __name__ == "__main__":
    main()
