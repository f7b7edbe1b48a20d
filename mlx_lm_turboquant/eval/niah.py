"""Needle in a haystack: can the model copy a fact planted early in a long context?

The haystack is real text (token ids); the needle is an assignment ``<name> = <number>``
inserted at a line boundary at a given depth, and the prompt ends with ``<name> =`` so a
model with working long-range attention completes the number. The same prompts run
through the uncompressed cache and through each scheme.
"""

import math
import string
from dataclasses import asdict, dataclass, field
from typing import Dict, List

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from ..api import make_prompt_cache


@dataclass
class NeedleResult:
    scheme: str
    lengths: List[int]
    depths: List[float]
    trials: int
    hits: List[List[int]]  # [depth][length] hit counts
    answers: List[Dict] = field(default_factory=list)

    def rate(self):
        return np.array(self.hits) / self.trials

    def as_dict(self):
        return asdict(self)


def _line_starts(tokenizer, ids):
    """Positions just after a token whose text ends a line."""
    ends = {t for t in set(ids.tolist()) if tokenizer.decode([t]).endswith("\n")}
    return np.array([i + 1 for i, t in enumerate(ids.tolist()) if t in ends])


def make_prompt(tokenizer, haystack_ids, length, depth, rng):
    """``(prompt_ids, answer_text)`` of exactly ``length`` tokens."""
    name = "".join(rng.choice(list(string.ascii_lowercase), 6)) + "_key"
    value = str(rng.integers(10000, 99999))
    needle = tokenizer.encode(f"{name} = {value}\n", add_special_tokens=False)
    query = tokenizer.encode(f"\n\n{name} =", add_special_tokens=False)
    n_hay = length - len(needle) - len(query)
    if n_hay < 16:
        raise ValueError(f"context length {length} is too short for a needle")
    start = int(rng.integers(0, len(haystack_ids) - n_hay))
    hay = np.asarray(haystack_ids[start : start + n_hay])
    starts = _line_starts(tokenizer, hay)
    target = int(depth * n_hay)
    pos = int(starts[np.argmin(np.abs(starts - target))]) if len(starts) else target
    ids = np.concatenate([hay[:pos], needle, hay[pos:], query]).astype(np.int32)
    return ids, value


def _complete(model, ids, cache, n_tokens, chunk=512):
    x = mx.array(ids[None])
    for s in range(0, len(ids) - 1, chunk):
        model(x[:, s : min(len(ids) - 1, s + chunk)], cache=cache)
        mx.eval([c.state for c in cache])
    y, out = x[:, -1:], []
    for _ in range(n_tokens):
        y = model(y, cache=cache)[:, -1].argmax(-1)[:, None]
        out.append(int(y.item()))
    return out


def needle_in_haystack(model, tokenizer, haystack_ids, schemes, lengths, depths, trials=5, seed=0,
                       layers=None, progress=None) -> List[NeedleResult]:  # fmt: skip
    """Hit counts per (depth, length) for the uncompressed cache ("fp16") and each scheme."""
    names = ["fp16"] + [str(getattr(s, "name", s)) for s in schemes]
    results = {n: NeedleResult(n, list(lengths), list(depths), trials,
                               [[0] * len(lengths) for _ in depths]) for n in names}  # fmt: skip
    rng = np.random.default_rng(seed)
    for di, depth in enumerate(depths):
        for li, length in enumerate(lengths):
            for t in range(trials):
                ids, value = make_prompt(tokenizer, haystack_ids, length, depth, rng)
                n_answer = len(tokenizer.encode(" " + value, add_special_tokens=False)) + 1
                for name, scheme in zip(names, [None] + list(schemes)):
                    if scheme is None:
                        cache = mlx_cache.make_prompt_cache(model)
                    else:
                        cache = make_prompt_cache(model, scheme, layers=layers)
                    text = tokenizer.decode(_complete(model, ids, cache, n_answer))
                    hit = text.strip().startswith(value)
                    results[name].hits[di][li] += int(hit)
                    results[name].answers.append(
                        {"length": length, "depth": depth, "trial": t, "expected": value,
                         "got": text, "hit": hit}  # fmt: skip
                    )
                if progress is not None:
                    progress.update(1)
    return [results[n] for n in names]


def paired_difference(reference: NeedleResult, other: NeedleResult) -> List[Dict]:
    """``other`` against ``reference`` on the same prompts, per context length and overall.

    The prompts are paired, so only discordant ones carry information: ``lost`` (reference
    hit, other missed) and ``gained``. Each row has the hit-rate difference, its 95%
    confidence interval (normal approximation of the paired difference) and the exact
    two-sided McNemar p-value (a binomial test on the discordant prompts).
    """
    pairs = list(zip(reference.answers, other.answers))
    if len(reference.answers) != len(other.answers) or any(
        (a["length"], a["depth"], a["trial"]) != (b["length"], b["depth"], b["trial"])
        for a, b in pairs
    ):
        raise ValueError(f"{reference.scheme} and {other.scheme} did not answer the same prompts")
    rows = []
    for length in reference.lengths + ["all"]:
        sel = [(a["hit"], b["hit"]) for a, b in pairs if length in ("all", a["length"])]
        n = len(sel)
        lost = sum(a and not b for a, b in sel)
        gained = sum(b and not a for a, b in sel)
        diff = (gained - lost) / n
        se = math.sqrt(max(lost + gained - n * diff**2, 0.0)) / n
        k, m = min(lost, gained), lost + gained
        p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m) if m else 1.0
        rows.append({"length": length, "prompts": n, "reference_hits": sum(a for a, _ in sel),
                     "hits": sum(b for _, b in sel), "lost": lost, "gained": gained,
                     "difference": diff, "ci95": [diff - 1.96 * se, diff + 1.96 * se],
                     "p_value": p})  # fmt: skip
    return rows


def against_first(results: List[NeedleResult]) -> Dict[str, List[Dict]]:
    """:func:`paired_difference` of every result against the first (fp16)."""
    return {r.scheme: paired_difference(results[0], r) for r in results[1:]}


def markdown_tables(results: List[NeedleResult], paired: Dict[str, List[Dict]]) -> str:
    """Hit rates per cache and context length, then each scheme paired with fp16."""
    lengths = results[0].lengths
    lines = ["| cache | " + " | ".join(f"{n} tokens" for n in lengths) + " | all |",
             "|---" * (len(lengths) + 2) + "|"]  # fmt: skip
    for r in results:
        rate = r.rate()
        cells = " | ".join(f"{100 * rate[:, j].mean():.0f}%" for j in range(len(lengths)))
        lines.append(f"| {r.scheme} | {cells} | {100 * rate.mean():.1f}% |")
    lines += ["", "| scheme vs fp16 | length | prompts | lost | gained | difference (95% CI) | "
              "McNemar p |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, rows in paired.items():
        for row in rows:
            lo, hi = row["ci95"]
            lines.append(f"| {name} | {row['length']} | {row['prompts']} | {row['lost']} | "
                         f"{row['gained']} | {100 * row['difference']:+.1f} pts ({100 * lo:+.1f}, "
                         f"{100 * hi:+.1f}) | {row['p_value']:.3g} |")  # fmt: skip
    return "\n".join(lines)


def plot_heatmaps(results: List[NeedleResult], path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results) + 1, 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        im = ax.imshow(r.rate(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(r.lengths)), [str(n) for n in r.lengths], rotation=45)
        labels = [f"{d:.0%}" for d in r.depths] if ax is axes[0][0] else []
        ax.set_yticks(range(len(r.depths)), labels)
        ax.set_title(f"{r.scheme}: {r.rate().mean():.0%}")
        ax.set_xlabel("context length")
        for (i, j), v in np.ndenumerate(r.rate()):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="hit rate")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
