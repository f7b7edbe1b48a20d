"""KV bytes and peak memory of a prefill through a compressed cache against the plain one."""

from dataclasses import asdict, dataclass

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import cache as mlx_cache

from ..api import make_prompt_cache
from .kld import kv_bytes


@dataclass
class PrefillMemory:
    scheme: str  # "fp16" for mlx-lm's own cache
    tokens: int
    chunk: int
    kv_bytes: int  # bytes the cache holds afterwards (uncompressed layers at 2 bytes/element)
    peak_bytes: int  # mlx's peak memory during the prefill, weights included
    weights_bytes: int

    def as_dict(self):
        return asdict(self)


def prefill_peak_memory(model, ids, scheme=None, tokens=4096, chunk=512, layers=None) -> PrefillMemory:
    """Prefill ``tokens`` ids in chunks of ``chunk`` and record mlx's peak memory.

    ``scheme=None`` measures mlx-lm's uncompressed KVCache.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) < tokens:
        raise ValueError(f"need a 1-D array of at least {tokens} ids, got shape {ids.shape}")
    if scheme is None:
        cache = mlx_cache.make_prompt_cache(model)
    else:
        cache = make_prompt_cache(model, scheme, layers=layers)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    x = mx.array(ids[None, :tokens])
    mx.eval(x)
    mx.clear_cache()
    mx.reset_peak_memory()
    for start in range(0, tokens, chunk):
        logits = model(x[:, start : start + chunk], cache=cache)
        mx.eval(logits[:, -1], [c.state for c in cache])
        del logits
    peak = mx.get_peak_memory()
    name = "fp16" if scheme is None else str(getattr(scheme, "name", scheme))
    return PrefillMemory(name, tokens, chunk, kv_bytes(cache), peak, weights)


def _bits(scheme, kind) -> str:
    """"4", "3+1" (prod keys: MSE bits + QJL bit) or "2.5" (split: the average)."""
    if kind == "keys" and scheme.variant == "prod":
        return f"{scheme.key_bits - 1}+1"
    return f"{scheme.bits_per_coordinate(kind):g}"


def bytes_table(dim: int = 128, n_kv_heads: int = 1) -> str:
    """Markdown table of KV bytes per token per layer for every scheme, against fp16."""
    from ..api import schemes
    from ..config import parse_scheme

    fp16 = 2 * n_kv_heads * dim * 2
    lines = [
        f"| scheme | key bits | value bits | bytes/token/layer ({n_kv_heads} KV head, D={dim}) | vs fp16 | compression |",
        "|---|---|---|---|---|---|",
        f"| fp16 | 16 | 16 | {fp16} | 1.000x | 1.00x |",
    ]
    for name in schemes():
        s = parse_scheme(name)
        b = s.bytes_per_token(n_kv_heads, dim)
        lines.append(
            f"| {name} | {_bits(s, 'keys')} | {_bits(s, 'values')} | {b} | {b / fp16:.3f}x | "
            f"{fp16 / b:.2f}x |"
        )
    return "\n".join(lines)
