"""Python API: ``make_prompt_cache`` and ``schemes``."""

from typing import List, Optional

from mlx_lm.models import cache as mlx_cache

from .cache import TurboQuantKVCache
from .config import builtin_scheme_names, parse_scheme, resolve_layers

# Chosen from the layer study in docs/evaluation.md: on tq-llama-8k compressing
# every layer met the quality floor, and the boundary layers bought little.
DEFAULT_LAYERS = "all"

# Models whose plain KVCache holds MLA latents or indexer keys rather than per-head
# K/V: compressing those with a per-head codec would be wrong.
LATENT_CACHE_MODELS = frozenset(
    "bailing_hybrid bailing_moe_v3 deepseek_v3 deepseek_v32 glm4_moe_lite kimi_k3 "
    "kimi_linear longcat_flash mistral4 minimax_m3_vl".split()
)
# Models that compute attention themselves instead of calling mlx-lm's dispatcher.
OWN_ATTENTION_MODELS = frozenset("gemma2 olmo plamo2 deepseek_v41".split())


def schemes() -> List[str]:
    """Names of the available KV schemes."""
    return builtin_scheme_names()


def model_family(model) -> str:
    return type(model).__module__.rsplit(".", 1)[-1]


def unsupported_reason(model) -> Optional[str]:
    """Why no layer of ``model`` can be compressed, or None."""
    family = model_family(model)
    if family in LATENT_CACHE_MODELS:
        return f"{family} caches MLA latents, not per-head keys and values"
    if family in OWN_ATTENTION_MODELS:
        return f"{family} computes attention itself, bypassing mlx-lm's dispatcher"
    return None


def eligible_layers(cache: list) -> List[int]:
    """Positions in ``cache`` that hold a plain full-attention ``KVCache``."""
    return [i for i, c in enumerate(cache) if type(c) is mlx_cache.KVCache]


def make_prompt_cache(
    model, scheme="turbo4", layers: Optional[str] = None, max_kv_size: Optional[int] = None
) -> list:
    """An mlx-lm prompt cache for ``model`` with TurboQuant-compressed attention layers.

    Args:
        model: any mlx-lm model.
        scheme: scheme name (see :func:`schemes`) or a ``KVScheme``.
        layers: which full-attention layers to compress, counted among those layers
            only (``"all"``, ``"2:-2"``, ``"0,3-7"``, ...); default ``$MLX_TQ_LAYERS``,
            else ``DEFAULT_LAYERS``.
        max_kv_size: passed to mlx-lm's ``make_prompt_cache`` (a bounded cache is a
            ``RotatingKVCache``, which is left uncompressed).

    Layers that are not plain full-attention ``KVCache`` layers (sliding window,
    state-space, latent caches) are left as the model made them.
    """
    scheme = parse_scheme(scheme)
    cache = mlx_cache.make_prompt_cache(model, max_kv_size=max_kv_size)
    if unsupported_reason(model) is not None:
        return cache
    positions = eligible_layers(cache)
    for k in resolve_layers(layers, len(positions), DEFAULT_LAYERS):
        i = positions[k]
        cache[i] = TurboQuantKVCache(scheme, layer_index=i)
    return cache
