"""Integration with mlx-lm: patches of its seams."""

from . import attention_patch


def activate():
    """Apply the patches now (for scripts and environments without the bootstrap)."""
    attention_patch.install()


def deactivate():
    attention_patch.uninstall()
