"""Start-up bootstrap: standard library only, never imports mlx or mlx-lm.

Installed twice: inside the package (for ``activate()`` and tests) and at the root of
site-packages as ``_mlx_lm_turboquant_boot`` (run by ``mlx_lm_turboquant.pth`` and, on
Python versions implementing PEP 829, by ``mlx_lm_turboquant.start``). Both copies
share their state through ``sys`` so the hooks are registered once per process even
when the ``.pth`` line runs twice or both copies are imported.

``boot()`` puts a small ``MetaPathFinder`` first on ``sys.meta_path``. It watches a
few mlx-lm module names; when one of them finishes executing, the plugin is imported
and patches that module. Nested imports of watched modules are queued and handled
when the outermost one finishes, so the plugin never sees a half-initialized mlx_lm.
"""

import os
import sys

# `mlx_lm` covers the core seams: its __init__ imports generate, models.cache and
# models.base eagerly. Command modules load on demand (`mlx_lm.cli` imports them).
WATCHED = (
    "mlx_lm",
    "mlx_lm.generate",
    "mlx_lm.chat",
    "mlx_lm.cache_prompt",
    "mlx_lm.server",
    "mlx_lm.benchmark",
    "mlx_lm.evaluate",
    "mlx_lm.perplexity",
)
HANDLER = "mlx_lm_turboquant.integration.hooks"
_STATE = "_mlx_lm_turboquant_boot_state"


def _state() -> dict:
    state = getattr(sys, _STATE, None)
    if state is None:
        state = {
            "booted": False,  # boot() ran at start-up (or was called)
            "disabled": False,  # MLX_TQ_DISABLE=1 stopped it
            "enabled": True,  # deactivate() turns the hooks off
            "depth": 0,
            "pending": [],
            "fired": [],  # module names the hooks handled
            "errors": [],  # (module, message) of hooks that failed
        }
        setattr(sys, _STATE, state)
    return state


def disabled_by_env() -> bool:
    return os.environ.get("MLX_TQ_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


class _ChainedLoader:
    """Delegates to the real loader, then reports the executed module."""

    def __init__(self, loader, finder):
        self._loader, self._finder = loader, finder

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        state = _state()
        state["depth"] += 1
        try:
            self._loader.exec_module(module)
        finally:
            state["depth"] -= 1
            # Do not leave our wrapper visible to code that inspects loaders.
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader
        state["pending"].append(module.__name__)
        if state["depth"] == 0:
            _flush(state)


class TurboQuantImportFinder:
    """Finds nothing itself: wraps the loader other finders return for watched names."""

    _mlx_lm_turboquant = True

    def __init__(self, watched=WATCHED):
        self.watched = frozenset(watched)
        self._busy = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.watched or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.discard(fullname)
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ChainedLoader(spec.loader, self)
        return spec

    def invalidate_caches(self):
        pass


def _flush(state):
    while state["pending"]:
        name = state["pending"].pop(0)
        if not state["enabled"]:
            continue
        module = sys.modules.get(name)
        if module is None:  # its import failed
            continue
        try:
            handler = __import__(HANDLER, fromlist=["on_import"])
            handler.on_import(name, module)
            state["fired"].append(name)
        except Exception as e:  # never break the user's import of mlx-lm
            state["errors"].append((name, f"{type(e).__name__}: {e}"))
            sys.stderr.write(
                f"[mlx-lm-turboquant] could not patch {name} ({type(e).__name__}: {e}); "
                "--kv-scheme will not work. Run `mlx-lm-turboquant doctor`.\n"
            )


def find_finder():
    for finder in sys.meta_path:
        if getattr(finder, "_mlx_lm_turboquant", False):
            return finder
    return None


def install_finder() -> bool:
    """Put the finder first on ``sys.meta_path`` (once). Returns True if added now."""
    state = _state()
    state["enabled"] = True
    if find_finder() is not None:
        return False
    sys.meta_path.insert(0, TurboQuantImportFinder())
    return True


def uninstall_finder():
    _state()["enabled"] = False
    for finder in list(sys.meta_path):
        if getattr(finder, "_mlx_lm_turboquant", False):
            sys.meta_path.remove(finder)


def boot():
    """Entry point of the ``.pth`` line and the ``.start`` file. Never raises."""
    try:
        state = _state()
        if state["booted"] or state["disabled"]:
            return
        if disabled_by_env():
            state["disabled"] = True
            return
        state["booted"] = True
        install_finder()
        # mlx_lm imported before us (unusual: another .pth imported it): patch it now.
        for name in WATCHED:
            if name in sys.modules:
                state["pending"].append(name)
        if state["pending"] and state["depth"] == 0:
            _flush(state)
    except Exception as e:
        try:
            sys.stderr.write(f"[mlx-lm-turboquant] bootstrap failed: {type(e).__name__}: {e}\n")
        except Exception:
            pass


def status() -> dict:
    """A copy of the shared bootstrap state, for ``doctor``."""
    state = _state()
    return {
        "booted": state["booted"],
        "disabled": state["disabled"],
        "enabled": state["enabled"],
        "finder_installed": find_finder() is not None,
        "fired": list(state["fired"]),
        "errors": list(state["errors"]),
    }
