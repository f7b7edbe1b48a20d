"""Seam: the ``kv_scheme=`` keyword of mlx-lm's generation API.

``generate`` and ``stream_generate`` pass unknown keywords down to ``generate_step`` /
``speculative_generate_step`` (module globals looked up per call), and
``batch_generate`` passes them to ``BatchGenerator``; wrapping those three is enough.
``kv_layers=`` goes with ``kv_scheme=``.
"""

from . import _patching, state
from .cache_factory import create_cache

_UNSET = object()


def _check_kv_bits(selection, kwargs):
    if selection is not None and selection.scheme is not None:
        if kwargs.get("kv_bits") is not None:
            raise ValueError(
                f"{selection.source} {selection.scheme.name} and kv_bits={kwargs['kv_bits']} "
                "both compress the KV cache; use one of them"
            )


def check_cache(cache, selection, what="prompt_cache"):
    """A caller-made cache must agree with an explicit ``kv_scheme=``."""
    from ..cache import TurboQuantKVCache

    found = {c.scheme.name for c in cache if isinstance(c, TurboQuantKVCache)}
    asked = selection.scheme
    if asked is None and found:
        raise ValueError(f"{what} holds a {'/'.join(sorted(found))} cache but kv_scheme='none'")
    if asked is not None and found and found != {asked.name}:
        raise ValueError(
            f"{what} holds a {'/'.join(sorted(found))} cache but kv_scheme={asked.name!r}"
        )
    if asked is not None and not found:
        raise ValueError(
            f"{what} was made without a KV scheme but kv_scheme={asked.name!r}; make it with "
            "mlx_lm_turboquant.make_prompt_cache(model, scheme) or pass no prompt_cache"
        )


def _selection(kv_scheme, kv_layers):
    if kv_scheme is _UNSET:
        if kv_layers is not None:
            raise ValueError("kv_layers= needs kv_scheme=")
        return None
    return state.select(kv_scheme, kv_layers, "kv_scheme=")


def _wrap_generate_step(original):
    def generate_step(prompt, model, *args, kv_scheme=_UNSET, kv_layers=None, **kwargs):
        selection = _selection(kv_scheme, kv_layers)
        _check_kv_bits(selection or state.active(), kwargs)
        if selection is not None:
            if kwargs.get("prompt_cache") is None:
                kwargs["prompt_cache"] = create_cache(model, kwargs.get("max_kv_size"), selection)
            else:
                check_cache(kwargs["prompt_cache"], selection)
        return original(prompt, model, *args, **kwargs)

    generate_step.__doc__ = original.__doc__
    return generate_step


def _wrap_speculative(original):
    def speculative_generate_step(
        prompt, model, draft_model, *args, kv_scheme=_UNSET, kv_layers=None, **kwargs
    ):
        selection = _selection(kv_scheme, kv_layers)
        _check_kv_bits(selection or state.active(), kwargs)
        if selection is not None:
            if kwargs.get("prompt_cache") is None:
                kwargs["prompt_cache"] = create_cache(
                    model, None, selection, "model"
                ) + create_cache(draft_model, None, selection, "draft")
            else:
                check_cache(kwargs["prompt_cache"], selection)
        return original(prompt, model, draft_model, *args, **kwargs)

    speculative_generate_step.__doc__ = original.__doc__
    return speculative_generate_step


def batch_support_missing() -> bool:
    from ..cache import TurboQuantKVCache

    return not hasattr(TurboQuantKVCache, "merge")


BATCH_MESSAGE = (
    "batch generation (batch_generate, BatchGenerator, benchmark --batch-size > 1, "
    "evaluate's generation tasks) with a KV scheme needs batch TurboQuant caches, which this "
    "version does not have yet; use generate / stream_generate (one sequence at a time)"
)


def _wrap_batch_init(original):
    def __init__(self, model, *args, kv_scheme=_UNSET, kv_layers=None, **kwargs):
        selection = _selection(kv_scheme, kv_layers)
        effective = selection or state.active()
        if effective is not None and effective.scheme is not None and batch_support_missing():
            self._old_wired_limit = None  # read by BatchGenerator.__del__
            raise ValueError(f"{effective.source} {effective.scheme.name}: {BATCH_MESSAGE}")
        self._tq_selection = selection
        original(self, model, *args, **kwargs)

    return __init__


def _wrap_insert_segments(original):
    def insert_segments(self, *args, **kwargs):
        selection = getattr(self, "_tq_selection", None)
        if selection is None:
            return original(self, *args, **kwargs)
        with state.using(selection):
            return original(self, *args, **kwargs)

    return insert_segments


_FUNCTIONS = {
    "generate_step": _wrap_generate_step,
    "speculative_generate_step": _wrap_speculative,
}
_METHODS = {"__init__": _wrap_batch_init, "insert_segments": _wrap_insert_segments}


def install():
    import importlib

    generate = importlib.import_module("mlx_lm.generate")  # `mlx_lm.generate` is a function
    for name, wrap in _FUNCTIONS.items():
        _patching.swap(generate, name, wrap)
    for name, wrap in _METHODS.items():
        _patching.swap(generate.BatchGenerator, name, wrap, copies=False)


def uninstall():
    generate = _patching.loaded("mlx_lm.generate")
    if generate is None:
        return
    for name in _FUNCTIONS:
        _patching.restore(generate, name)
    for name in _METHODS:
        _patching.restore(generate.BatchGenerator, name, copies=False)


def is_installed() -> bool:
    generate = _patching.loaded("mlx_lm.generate")
    return (
        generate is not None
        and all(_patching.swapped(generate, n) for n in _FUNCTIONS)
        and all(_patching.swapped(generate.BatchGenerator, n) for n in _METHODS)
    )
