"""The plugin manager: built-ins, then entry points of the ``mlx_lm_turboquant`` group.

Entry points are read once, on first use (never at interpreter start-up). Set
``MLX_TQ_NO_PLUGINS=1`` to skip them; tests build managers without them.
"""

import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import pluggy

from ..config import KVScheme, parse_scheme
from . import builtin, hookspecs

ENTRY_POINT_GROUP = hookspecs.PROJECT


@dataclass(frozen=True)
class SchemeInfo:
    scheme: KVScheme
    layers: Optional[str]
    description: str
    plugin: str  # "builtin" or the plugin's registered name


_pm: Optional[pluggy.PluginManager] = None
_registry: Optional[Dict[str, SchemeInfo]] = None


def make_plugin_manager(load_entrypoints: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name="builtin")
    if load_entrypoints and os.environ.get("MLX_TQ_NO_PLUGINS", "") not in ("1", "true"):
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as e:  # a broken plugin must not break mlx-lm
            sys.stderr.write(f"[mlx-lm-turboquant] a scheme plugin failed to load: {e}\n")
    return pm


def collect(pm: pluggy.PluginManager) -> Dict[str, SchemeInfo]:
    """Ask every plugin for its schemes. Two plugins claiming a name is an error."""
    registry: Dict[str, SchemeInfo] = {}
    for impl in pm.hook.register_kv_schemes.get_hookimpls():
        plugin = pm.get_name(impl.plugin) or repr(impl.plugin)

        def register(scheme, layers=None, description="", _plugin=plugin):
            if not isinstance(scheme, KVScheme):
                raise ValueError(
                    f"plugin {_plugin!r} registered {scheme!r}; register() takes a KVScheme"
                )
            key = scheme.name.lower()
            if not key or any(c.isspace() for c in key) or key == "none":
                raise ValueError(f"plugin {_plugin!r}: invalid scheme name {scheme.name!r}")
            if key in registry:
                raise ValueError(
                    f"scheme {scheme.name!r} is registered twice: by "
                    f"{registry[key].plugin!r} and by {_plugin!r}"
                )
            registry[key] = SchemeInfo(scheme, layers, description, _plugin)

        impl.function(register=register)
    return registry


def get_plugin_manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        _pm = make_plugin_manager()
    return _pm


def available() -> Dict[str, SchemeInfo]:
    """All registered schemes by name (built-ins first, then plugins)."""
    global _registry
    if _registry is None:
        _registry = collect(get_plugin_manager())
    return _registry


def reset(pm: Optional[pluggy.PluginManager] = None):
    """Use ``pm`` (or rebuild on next use). For tests and plugin authors."""
    global _pm, _registry
    _pm, _registry = pm, None


def scheme_names() -> List[str]:
    return [info.scheme.name for info in available().values()]


def get_scheme(name) -> SchemeInfo:
    """The registered scheme called ``name`` (a ``KVScheme`` passes through).

    Raises ValueError listing the registered names when ``name`` is unknown.
    """
    if isinstance(name, KVScheme):
        info = available().get(name.name.lower())
        if info is not None and info.scheme == name:
            return info
        return SchemeInfo(name, None, "", "direct")
    if not isinstance(name, str):
        raise ValueError(f"a KV scheme is a name such as 'turbo4', got {name!r}")
    info = available().get(name.strip().lower())
    if info is not None:
        return info
    try:  # any well-formed built-in form, e.g. "turbo4v4"
        return SchemeInfo(parse_scheme(name), None, "", "builtin")
    except ValueError:
        pass
    raise ValueError(f"unknown KV scheme {name!r}; registered: {', '.join(scheme_names())}")
