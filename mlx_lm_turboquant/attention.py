"""``turboquant_sdpa``: attention on a TurboQuant cache.

Dispatches to a fused kernel for the current backend when one is registered and
falls back to the pure-MLX reference path otherwise.
"""

from typing import Optional, Union

import mlx.core as mx

from . import kernels
from .kernels.reference import reference_sdpa


def turboquant_sdpa(
    queries: mx.array,
    cache,
    scale: float,
    mask: Union[None, str, mx.array] = None,
    sinks: Optional[mx.array] = None,
) -> mx.array:
    """Scaled dot-product attention of ``queries`` over a :class:`TurboQuantKVCache`.

    Args:
        queries: ``[B, H_q, L, D_k]``; ``H_q`` a multiple of the cache's KV heads (GQA).
        cache: the layer's TurboQuantKVCache, already updated with this step's keys/values.
        scale: multiplier of the scores, usually ``D_k ** -0.5``.
        mask: ``None``, ``"causal"``, or a bool / additive array broadcastable to
            ``[B, H_q, L, offset]``.
        sinks: optional ``[H_q]`` attention-sink logits.

    Returns:
        ``[B, H_q, L, D_v]`` in ``queries.dtype``.
    """
    if mask is None and sinks is None and cache._lane is not None:
        out = kernels.fast_attention(cache, queries, scale)  # a decode step repeating the last
        if out is not None:
            return out
    if cache.empty():
        raise ValueError("turboquant_sdpa needs a cache holding at least one token")
    if queries.shape[-1] != cache.k_dim:
        raise ValueError(f"queries have D={queries.shape[-1]}, the cache's keys D={cache.k_dim}")
    out = kernels.run("decode_attention", queries, cache, scale, mask=mask, sinks=sinks)
    if out is None:
        out = reference_sdpa(queries, cache, scale, mask=mask, sinks=sinks)
    return out
