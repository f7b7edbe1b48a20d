"""Route mlx-lm's attention dispatcher to ``turboquant_sdpa`` for TurboQuant caches.

About a hundred model modules copy ``scaled_dot_product_attention`` with
``from .base import ...``, so replacing it in ``mlx_lm.models.base`` is not enough for
modules already imported: their copies are rebound too. Idempotent and reversible.
"""

import sys

from ..attention import turboquant_sdpa
from ..batch_cache import BatchTurboQuantKVCache
from ..cache import CompressedKV, TurboQuantKVCache

_ORIGINAL = None


def _make_dispatcher(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(keys, CompressedKV):
            # The handle names its cache: some models attend over another layer's
            # keys (KV sharing, loop layers) while passing their own cache.
            cache = keys.cache
        if isinstance(cache, BatchTurboQuantKVCache):  # padding is masked out by `mask`
            cache = cache.attention_cache()
        if isinstance(cache, TurboQuantKVCache):
            return turboquant_sdpa(queries, cache, scale=scale, mask=mask, sinks=sinks)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention.__wrapped__ = original
    scaled_dot_product_attention._turboquant = True
    return scaled_dot_product_attention


def _rebind(old, new):
    for name, module in list(sys.modules.items()):
        if (
            name.startswith("mlx_lm.models.")
            and getattr(module, "scaled_dot_product_attention", None) is old
        ):
            module.scaled_dot_product_attention = new


def install():
    """Patch ``mlx_lm.models.base.scaled_dot_product_attention`` and its copies."""
    global _ORIGINAL
    from mlx_lm.models import base

    if getattr(base.scaled_dot_product_attention, "_turboquant", False):
        _rebind(_ORIGINAL, base.scaled_dot_product_attention)
        return
    _ORIGINAL = base.scaled_dot_product_attention
    base.scaled_dot_product_attention = _make_dispatcher(_ORIGINAL)
    _rebind(_ORIGINAL, base.scaled_dot_product_attention)


def uninstall():
    global _ORIGINAL
    from mlx_lm.models import base

    if _ORIGINAL is None or not getattr(base.scaled_dot_product_attention, "_turboquant", False):
        return
    patched = base.scaled_dot_product_attention
    base.scaled_dot_product_attention = _ORIGINAL
    _rebind(patched, _ORIGINAL)
    _ORIGINAL = None


def is_installed() -> bool:
    from mlx_lm.models import base

    return getattr(base.scaled_dot_product_attention, "_turboquant", False)
