"""Called by the bootstrap's import finder when a watched mlx-lm module has loaded."""

from . import install_loaded


def on_import(name, module):
    install_loaded()
