"""The one-line report printed on stderr each time a compressed cache is created.

Silence it with ``MLX_TQ_QUIET=1``.
"""

import os
import sys

PREFIX = "[mlx-lm-turboquant]"


def quiet() -> bool:
    return os.environ.get("MLX_TQ_QUIET", "").strip().lower() in ("1", "true", "yes", "on")


def emit(line: str, force: bool = False):
    if force or not quiet():
        sys.stderr.write(f"{PREFIX} {line}\n")
        sys.stderr.flush()


def ranges(indices) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [i]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out) or "-"


def _head_shape(model, i):
    """(kv heads, key dim, value dim) of layer ``i``, or None when not discoverable."""
    layers = getattr(model, "layers", None)
    try:
        layer = layers[i]
    except Exception:
        return None
    for name in ("self_attn", "attention", "attn", "mixer"):
        attn = getattr(layer, name, None)
        if attn is None:
            continue
        heads = getattr(attn, "n_kv_heads", None) or getattr(attn, "num_key_value_heads", None)
        dim = getattr(attn, "head_dim", None)
        if isinstance(heads, int) and isinstance(dim, int):
            v_dim = getattr(attn, "v_head_dim", None)
            return heads, dim, v_dim if isinstance(v_dim, int) else dim
    args = getattr(model, "args", None)
    heads = getattr(args, "num_key_value_heads", None)
    dim = getattr(args, "head_dim", None)
    if dim is None and getattr(args, "num_attention_heads", None):
        dim = getattr(args, "hidden_size", 0) // args.num_attention_heads
    if isinstance(heads, int) and isinstance(dim, int) and dim > 0:
        return heads, dim, dim
    return None


def bytes_per_token(model, plan):
    """(compressed, fp16) KV bytes per token over the full-attention layers, or None."""
    attention_layers = plan.compressed + plan.kept.get("layer spec", [])
    total = fp16 = 0
    for i in attention_layers:
        shape = _head_shape(model, i)
        if shape is None:
            return None
        heads, k_dim, v_dim = shape
        fp16 += heads * (k_dim + v_dim) * 2
        if i in plan.compressed:
            scheme = plan.overrides.get(i, plan.scheme)
            total += scheme.bytes_per_token(heads, k_dim, v_dim)
        else:
            total += heads * (k_dim + v_dim) * 2
    return total, fp16


def describe(model, plan, source: str, label: str = "") -> str:
    s = plan.scheme
    who = f"{label}: " if label else ""
    n = plan.n_layers
    if plan.unsupported is not None:
        return (
            f"{who}{s.name} NOT applied ({source}): {plan.unsupported}; "
            f"all {n} layers keep mlx-lm's cache"
        )
    kept = "; ".join(f"kept {ranges(idx)} ({why})" for why, idx in plan.kept.items())
    if not plan.compressed:
        return (
            f"{who}{s.name} NOT applied ({source}): no layer can take it "
            f"({kept or 'no KVCache or RotatingKVCache layer'}); for models without their "
            "own cache layout --max-kv-size makes every layer a (compressible) RotatingKVCache"
        )
    parts = [
        f"{who}{s.name} ({source}) on {len(plan.compressed)}/{n} layers [{ranges(plan.compressed)}]"
    ]
    if plan.overrides:
        by_name = {}
        for i, scheme in plan.overrides.items():
            by_name.setdefault(scheme.name, []).append(i)
        parts.append(", ".join(f"{ranges(idx)} as {name}" for name, idx in by_name.items()))
    if kept:
        parts.append(kept.replace("(layer spec)", f"(layers '{plan.layers_spec}')"))
    for why, idx in plan.uncentred.items():
        parts.append(f"keys of {ranges(idx)} NOT centred ({why})")
    sizes = bytes_per_token(model, plan)
    if sizes is not None:
        ours, fp16 = sizes
        parts.append(f"KV {ours:,} B/token vs {fp16:,} fp16 ({fp16 / ours:.2f}x smaller)")
    return "; ".join(parts)


def report(model, plan, source: str, label: str = ""):
    # A scheme (or its centring) that cannot take effect is said even when quiet.
    emit(describe(model, plan, source, label), force=not plan.compressed or bool(plan.uncentred))
