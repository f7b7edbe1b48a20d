"""Called by the bootstrap's import finder when a watched mlx-lm module has loaded."""

from . import cli_patch, install_loaded


def on_import(name, module):
    install_loaded()
    if name == "mlx_lm":
        command = cli_patch.main_module_command()
        if command is not None:
            cli_patch.install_for_main_module(command)
