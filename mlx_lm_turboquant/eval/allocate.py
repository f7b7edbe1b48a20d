"""Bits per layer from measured sensitivity: a layer plan that fits a size budget.

Each candidate format is measured on each attention layer alone (the others uncompressed),
as teacher-forced KL against the fp16 cache. Single-layer KLs add up closely to the KL of
compressing several layers (docs/evaluation.md), so the plan of least summed KL within the
budget is found exactly by a knapsack over the layers. The plan is a layer spec such as
``"0=turbo3,1=turbo4,..."``; save it with ``--out`` and pass ``--kv-layers @plan.json``
(or ``MLX_TQ_LAYERS=@plan.json``).
"""

from typing import Dict, List, Sequence

FP16 = "fp16"


def allocate(kl: Dict[str, Sequence[float]], cost: Dict[str, Sequence[int]],
             budget: int) -> List[str]:  # fmt: skip
    """Formats per layer of least summed ``kl`` with summed ``cost`` at most ``budget``.

    Args:
        kl: format -> KL per layer with that layer alone in that format.
        cost: format -> bytes per token per layer (integers, so the search is exact).
        budget: bytes per token over all layers.
    """
    if not kl or set(kl) != set(cost):
        raise ValueError(
            f"kl and cost must name the same formats, got {sorted(kl)} and {sorted(cost)}"
        )
    n = {len(v) for v in list(kl.values()) + list(cost.values())}
    if len(n) != 1:
        raise ValueError(f"every format needs one value per layer, got lengths {sorted(n)}")
    n_layers = n.pop()
    # Pareto front of partial plans: cost so far -> (summed KL, formats).
    front = {0: (0.0, [])}
    for layer in range(n_layers):
        grown = {}
        for c, (k, plan) in front.items():
            for f in kl:
                c2, k2 = c + cost[f][layer], k + kl[f][layer]
                if c2 <= budget and (c2 not in grown or k2 < grown[c2][0]):
                    grown[c2] = (k2, plan + [f])
        best, front = float("inf"), {}
        for c in sorted(grown):  # keep a plan only if it beats every cheaper one
            if grown[c][0] < best:
                best, front[c] = grown[c][0], grown[c]
        if not front:
            cheapest = sum(min(cost[f][i] for f in cost) for i in range(n_layers))
            raise ValueError(
                f"budget {budget} B/token is below the cheapest plan ({cheapest} B/token)"
            )
    return min(front.values(), key=lambda kp: kp[0])[1]


def plan_spec(formats: Sequence[str]) -> str:
    """``["turbo3", "turbo3", "turbo4"]`` -> ``"0-1=turbo3,2=turbo4"`` (a layer spec)."""
    items, start = [], 0
    for i in range(1, len(formats) + 1):
        if i == len(formats) or formats[i] != formats[start]:
            span = str(start) if i - 1 == start else f"{start}-{i - 1}"
            items.append(f"{span}={formats[start]}")
            start = i
    return ",".join(items)


def layer_costs(cache, formats) -> Dict[str, List[int]]:
    """Bytes per token per attention layer for each format, from an fp16 cache that has
    seen tokens (its plain KVCache entries give the head shapes)."""
    from ..api import eligible_layers
    from ..config import parse_scheme

    out = {}
    for f in formats:
        out[f] = []
        for i in eligible_layers(cache):
            _, heads, _, k_dim = cache[i].keys.shape
            v_dim = cache[i].values.shape[-1]
            fp16 = 2 * heads * (k_dim + v_dim)
            bytes_ = fp16 if f == FP16 else parse_scheme(f).bytes_per_token(heads, k_dim, v_dim)
            out[f].append(bytes_)
    return out


def measure(model, windows, formats, prefill, steps, progress=None):
    """``({format: KL per layer alone, averaged over windows}, an fp16 cache)`` for the
    token-id arrays in ``windows``."""
    from .kld import reference_run, teacher_forced_kl

    refs = [reference_run(model, ids, prefill, steps) for ids in windows]
    n = len(layer_costs(refs[0][1], [FP16])[FP16])
    out = {}
    for f in formats:
        out[f] = []
        for layer in range(n):
            if f == FP16:
                out[f].append(0.0)
                continue
            kls = [teacher_forced_kl(model, ids, f, str(layer), prefill, steps, reference=r).kl_mean
                   for ids, r in zip(windows, refs)]  # fmt: skip
            out[f].append(sum(kls) / len(kls))
            if progress is not None:
                progress.update(1)
    return out, refs[0][1]
