"""Integration with mlx-lm: one switch per patched seam.

Each seam has ``install()`` / ``uninstall()`` / ``is_installed()``; all are idempotent.
The bootstrap (``bootstrap.py``, run from a ``.pth`` file at start-up) installs them
when mlx-lm is imported; :func:`activate` does the same for scripts and environments
without the ``.pth`` file, and :func:`deactivate` undoes everything.
"""

import sys

from . import (
    attention_patch,
    cache_factory,
    cli_patch,
    generate_patch,
    perplexity_patch,
    prompt_files,
)

try:  # the copy at the root of site-packages, which the .pth file ran (installed wheels
    import _mlx_lm_turboquant_boot as bootstrap  # carry only this copy)
except ImportError:  # a source checkout on sys.path
    from . import bootstrap

# Seams of mlx-lm's core (loaded with `import mlx_lm`).
CORE_SEAMS = {
    "attention": attention_patch,
    "make_prompt_cache": cache_factory,
    "prompt_cache_files": prompt_files,
    "generate_kwargs": generate_patch,
}
# Seams of command modules, installed when (and if) the command is imported.
COMMAND_SEAMS = {f"cli.{c}": cli_patch.CommandSeam(c) for c in cli_patch.COMMANDS}
COMMAND_SEAMS["perplexity_eval"] = perplexity_patch
SEAMS = {**CORE_SEAMS, **COMMAND_SEAMS}


def install_loaded():
    """Install the core seams and those of every command module already imported."""
    for seam in CORE_SEAMS.values():
        seam.install()
    for seam in COMMAND_SEAMS.values():
        seam.install()


def activate():
    """Apply the patches now and on later imports of mlx-lm's command modules.

    Imports mlx-lm. Safe to call any number of times.
    """
    bootstrap.install_finder()
    import mlx_lm  # noqa: F401  (the finder may already have patched it)

    install_loaded()


def deactivate():
    """Undo every patch and stop patching later imports."""
    bootstrap.uninstall_finder()
    cli_patch.uninstall_main_module_hook()
    if "mlx_lm" not in sys.modules:
        return
    for seam in reversed(list(SEAMS.values())):
        seam.uninstall()


def installed() -> dict:
    """``{seam name: is_installed()}``."""
    return {name: seam.is_installed() for name, seam in SEAMS.items()}
