"""The scheme registry: built-in schemes and third-party plugins, through one pluggy hook."""

from .hookspecs import hookimpl
from .manager import SchemeInfo, available, get_plugin_manager, get_scheme, scheme_names

__all__ = [
    "SchemeInfo",
    "available",
    "get_plugin_manager",
    "get_scheme",
    "hookimpl",
    "scheme_names",
]
