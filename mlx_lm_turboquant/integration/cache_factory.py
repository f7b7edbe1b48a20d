"""Seam: ``mlx_lm.models.cache.make_prompt_cache``.

Every mlx-lm path that creates a cache (generate, speculative decoding, batching,
server, chat, cache_prompt, evaluate) calls it; the wrapper compresses the chosen
layers when a scheme is active and prints the report.
"""

from typing import Optional

from . import _patching, report, state


def create_cache(
    model, max_kv_size: Optional[int], selection, label: str = "", report_it: bool = True
) -> list:
    """mlx-lm's cache for ``model``, compressed per ``selection`` (a ``state.Selection``)."""
    from ..api import base_make_prompt_cache, compress_cache

    cache = base_make_prompt_cache(model, max_kv_size=max_kv_size)
    if selection is None or selection.scheme is None:
        return cache
    plan = compress_cache(model, cache, selection.info.scheme, selection.layers)
    if report_it or not plan.compressed:
        report.report(model, plan, selection.source, label)
    return cache


def _wrap(original):
    def make_prompt_cache(model, max_kv_size=None):
        selection = state.active()
        if selection is None or selection.scheme is None:
            return original(model, max_kv_size=max_kv_size)
        return create_cache(model, max_kv_size, selection)

    make_prompt_cache.__doc__ = original.__doc__
    return make_prompt_cache


def install():
    from mlx_lm.models import cache

    _patching.swap(cache, "make_prompt_cache", _wrap)


def uninstall():
    module = _patching.loaded("mlx_lm.models.cache")
    if module is not None:
        _patching.restore(module, "make_prompt_cache")


def is_installed() -> bool:
    module = _patching.loaded("mlx_lm.models.cache")
    return module is not None and _patching.swapped(module, "make_prompt_cache")
