"""Seam: prompt-cache files (``save_prompt_cache`` / ``load_prompt_cache``).

* ``load_prompt_cache`` finds classes by name in ``mlx_lm.models.cache``: our cache
  classes (full and sliding-window, single and batch) are registered there.
* Saving records the scheme in the file's metadata (``kv_scheme``, ``kv_layers``).
* Loading checks the file before mlx-lm builds anything from it (readable, known
  class names, one entry per class, scheme metadata consistent with the layers) and
  turns any failure into a ``ValueError`` naming the file; each TurboQuant layer then
  validates its own arrays. A file whose scheme differs from the active
  ``--kv-scheme`` / ``kv_scheme=`` / ``$MLX_TQ_SCHEME`` is an error.
"""

import json

from . import _patching, state

CLASS_NAME = "TurboQuantKVCache"
BATCH_CLASS_NAME = "BatchTurboQuantKVCache"
ROTATING_CLASS_NAME = "RotatingTurboQuantKVCache"
BATCH_ROTATING_CLASS_NAME = "BatchRotatingTurboQuantKVCache"
CLASS_NAMES = (CLASS_NAME, BATCH_CLASS_NAME, ROTATING_CLASS_NAME, BATCH_ROTATING_CLASS_NAME)


def _classes():
    from ..batch_cache import BatchTurboQuantKVCache
    from ..cache import TurboQuantKVCache
    from ..rotating_batch_cache import BatchRotatingTurboQuantKVCache
    from ..rotating_cache import RotatingTurboQuantKVCache

    classes = (TurboQuantKVCache, BatchTurboQuantKVCache, RotatingTurboQuantKVCache,
               BatchRotatingTurboQuantKVCache)  # fmt: skip
    return dict(zip(CLASS_NAMES, classes))


def _known_classes(cache_module):
    base = cache_module._BaseCache
    return {
        name
        for name, obj in vars(cache_module).items()
        if isinstance(obj, type) and issubclass(obj, base) and obj is not base
    }


def _schemes_in(cache) -> dict:
    from ..cache import TurboQuantKVCache

    return {i: c.scheme for i, c in enumerate(cache) if isinstance(c, TurboQuantKVCache)}


def _wrap_save(original):
    def save_prompt_cache(file_name, cache, metadata=None):
        found = _schemes_in(cache)
        if found:
            metadata = dict(metadata or {})
            names = sorted({s.name for s in found.values()})
            metadata["kv_scheme"] = names[0] if len(names) == 1 else ",".join(names)
            metadata["kv_layers"] = json.dumps(sorted(found))
        return original(file_name, cache, metadata)

    save_prompt_cache.__doc__ = original.__doc__
    return save_prompt_cache


def _check_header(file_name, cache_module):
    """Read only the metadata and check it; returns the user metadata dict."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    try:
        arrays, raw = mx.load(str(file_name), return_metadata=True)
    except Exception as e:
        raise ValueError(f"cannot read prompt cache file {file_name}: {e}") from None
    try:
        metadata, classes, scalars = tree_unflatten(list(raw.items()))
    except Exception:
        raise ValueError(
            f"{file_name} is not an mlx-lm prompt cache file (metadata must hold user "
            "metadata, cache class names and scalar types)"
        ) from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{file_name}: the cache class list is malformed")
    known = _known_classes(cache_module)
    for i, name in enumerate(classes):
        if name not in known:
            raise ValueError(
                f"{file_name}: layer {i} has unknown cache class {name!r}; known: "
                f"{', '.join(sorted(known))}"
            )
    for item in (scalars or [""])[1:]:
        if not (isinstance(item, list) and len(item) == 2 and item[0] in arrays):
            raise ValueError(f"{file_name}: scalar entry {item!r} points at no stored array")
        if item[1] not in ("scalar", "string", "none"):
            raise ValueError(f"{file_name}: unknown scalar type {item[1]!r}")
        if item[1] != "none" and arrays[item[0]].size > 4096:
            raise ValueError(f"{file_name}: scalar {item[0]} holds {arrays[item[0]].size} values")
    return metadata if isinstance(metadata, dict) else {}, classes


def _check_scheme(file_name, cache, metadata):
    found = _schemes_in(cache)
    names = {s.name for s in found.values()}
    recorded = metadata.get("kv_scheme")
    if recorded is not None and set(recorded.split(",")) != names:
        raise ValueError(
            f"{file_name}: metadata says kv_scheme={recorded!r} but its layers hold "
            f"{sorted(names) or 'no TurboQuant cache'}"
        )
    selection = state.active()
    if selection is None:
        return
    asked = selection.scheme
    if asked is None:
        if found:
            raise ValueError(
                f"{file_name} holds a {'/'.join(sorted(names))} compressed cache but "
                f"{selection.source} asks for none"
            )
        return
    if not found:
        raise ValueError(
            f"{file_name} was written without a KV scheme, but {selection.source} asks for "
            f"{asked.name}; rebuild it with `mlx_lm.cache_prompt --kv-scheme {asked.name}`"
        )
    wrong = {i: s.name for i, s in found.items() if s != asked}
    if wrong:
        raise ValueError(
            f"{file_name} was written with kv_scheme {'/'.join(sorted(names))} but "
            f"{selection.source} asks for {asked.name} (layers {sorted(wrong)} differ)"
        )


def _check_plain_layers(file_name, cache, cache_module):
    """mlx-lm's KVCache trusts its arrays: check them too, so a damaged fp16 layer next
    to compressed ones fails here rather than in attention."""
    import mlx.core as mx

    for i, c in enumerate(cache):
        if type(c) is not cache_module.KVCache or c.keys is None:
            continue
        k, v = c.keys, c.values
        ok = (
            isinstance(k, mx.array)
            and isinstance(v, mx.array)
            and k.ndim == v.ndim == 4
            and k.shape[:3] == v.shape[:3]
            and mx.issubdtype(k.dtype, mx.floating)
            and mx.issubdtype(v.dtype, mx.floating)
        )
        if not ok:
            raise ValueError(
                f"{file_name}: layer {i} (KVCache) needs float keys and values of shape "
                "[B, H_kv, T, D] with the same B, H_kv and T"
            )


def _wrap_load(original):
    def load_prompt_cache(file_name, return_metadata=False):
        from mlx_lm.models import cache as cache_module

        metadata, classes = _check_header(file_name, cache_module)
        try:
            cache, metadata = original(file_name, return_metadata=True)
        except ValueError as e:
            raise ValueError(f"invalid prompt cache file {file_name}: {e}") from None
        except Exception as e:  # KeyError / IndexError / TypeError from hostile content
            raise ValueError(
                f"invalid prompt cache file {file_name}: {type(e).__name__}: {e}"
            ) from None
        _check_plain_layers(file_name, cache, cache_module)
        _check_scheme(file_name, cache, metadata)
        found = _schemes_in(cache)
        if found:
            from .report import emit, ranges

            names = "/".join(sorted({s.name for s in found.values()}))
            emit(f"{names} cache loaded from {file_name}: {len(found)}/{len(cache)} layers "
                 f"[{ranges(found)}] compressed, {len(cache) - len(found)} kept")  # fmt: skip
        return (cache, metadata) if return_metadata else cache

    load_prompt_cache.__doc__ = original.__doc__
    return load_prompt_cache


def install():
    from mlx_lm.models import cache as cache_module

    for name, cls in _classes().items():
        setattr(cache_module, name, cls)
    _patching.swap(cache_module, "save_prompt_cache", _wrap_save)
    _patching.swap(cache_module, "load_prompt_cache", _wrap_load)


def uninstall():
    module = _patching.loaded("mlx_lm.models.cache")
    if module is None:
        return
    _patching.restore(module, "save_prompt_cache")
    _patching.restore(module, "load_prompt_cache")
    for name in CLASS_NAMES:
        if name in vars(module):
            delattr(module, name)


def is_installed() -> bool:
    module = _patching.loaded("mlx_lm.models.cache")
    return (
        module is not None
        and all(name in vars(module) for name in CLASS_NAMES)
        and _patching.swapped(module, "save_prompt_cache")
        and _patching.swapped(module, "load_prompt_cache")
    )
