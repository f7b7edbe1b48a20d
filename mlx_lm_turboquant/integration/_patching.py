"""Swap a module attribute for a wrapper, and every copy of it in loaded mlx-lm modules.

mlx-lm modules copy each other's functions with ``from .x import name``; a swap
rebinds those copies too (by identity), and ``restore`` undoes exactly that.
"""

import sys

MARK = "_tq_original"


def _mlx_lm_modules():
    for name, module in list(sys.modules.items()):
        if module is not None and (name == "mlx_lm" or name.startswith("mlx_lm.")):
            yield module


def rebind(old, new):
    for module in _mlx_lm_modules():
        namespace = vars(module)
        for attr, value in list(namespace.items()):
            if value is old:
                setattr(module, attr, new)


def swap(owner, name: str, make_wrapper, copies: bool = True) -> bool:
    """Replace ``owner.name`` by ``make_wrapper(original)`` unless already done."""
    current = getattr(owner, name)
    if getattr(current, MARK, None) is not None:
        if copies:  # modules imported since may hold the original again
            rebind(getattr(current, MARK), current)
        return False
    wrapper = make_wrapper(current)
    setattr(wrapper, MARK, current)
    wrapper.__wrapped__ = current
    setattr(owner, name, wrapper)
    if copies:
        rebind(current, wrapper)
    return True


def restore(owner, name: str, copies: bool = True) -> bool:
    current = getattr(owner, name, None)
    original = getattr(current, MARK, None)
    if original is None:
        return False
    setattr(owner, name, original)
    if copies:
        rebind(current, original)
    return True


def swapped(owner, name: str) -> bool:
    return getattr(getattr(owner, name, None), MARK, None) is not None


def loaded(module_name: str):
    return sys.modules.get(module_name)
