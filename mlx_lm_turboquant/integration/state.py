"""Which scheme applies to the next cache mlx-lm creates.

Precedence: a ``kv_scheme=`` keyword (scoped to that call) > ``--kv-scheme`` on the
command line (process-wide: the server generates on another thread, so not a
contextvar alone) > ``$MLX_TQ_SCHEME``. ``"none"`` at any level means plain caches.
"""

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Optional

OFF = ("none", "off", "fp16", "")


@dataclass(frozen=True)
class Selection:
    """A resolved choice. ``info`` is None when the choice is "no scheme"."""

    info: Optional[object]  # schemes.SchemeInfo
    layers: Optional[str]
    source: str  # "--kv-scheme", "kv_scheme=", "MLX_TQ_SCHEME", "prompt cache file"

    @property
    def scheme(self):
        return None if self.info is None else self.info.scheme


_cli: Optional[Selection] = None
options: dict = {}  # command-line extras, e.g. {"kv_chunk_size": 256}
_scoped: contextvars.ContextVar = contextvars.ContextVar("mlx_tq_scoped", default=None)


def select(name, layers: Optional[str] = None, source: str = "kv_scheme=") -> Selection:
    """Resolve ``name`` (a registered name, a ``KVScheme``, or ``"none"``)."""
    from ..schemes import get_scheme

    if name is None or (isinstance(name, str) and name.strip().lower() in OFF):
        return Selection(None, None, source)
    try:
        return Selection(get_scheme(name), layers, source)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def from_env() -> Optional[Selection]:
    name = os.environ.get("MLX_TQ_SCHEME")
    if name is None or name.strip() == "":
        return None
    return select(name, os.environ.get("MLX_TQ_LAYERS"), "MLX_TQ_SCHEME")


def set_cli(selection: Optional[Selection]):
    global _cli
    _cli = selection


def active() -> Optional[Selection]:
    """The selection in force here, or None when nothing was asked for."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _cli is not None:
        return _cli
    return from_env()


@contextlib.contextmanager
def using(selection: Optional[Selection]):
    """Make ``selection`` the active one inside the block (this thread / context)."""
    token = _scoped.set(selection)
    try:
        yield selection
    finally:
        _scoped.reset(token)
