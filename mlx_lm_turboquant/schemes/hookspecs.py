"""The whole plugin contract.

A plugin is a module (or object) with functions marked ``@hookimpl``, published under
the ``mlx_lm_turboquant`` entry-point group. The built-in schemes register through the
same hook (``schemes/builtin.py``).
"""

import pluggy

PROJECT = "mlx_lm_turboquant"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_kv_schemes(register):
    """Register KV schemes by calling ``register(scheme, layers=None, description="")``.

    Args:
        register: callable taking
            scheme: a :class:`mlx_lm_turboquant.KVScheme` (its ``name`` is what users
                type after ``--kv-scheme``);
            layers: the default layer spec for this scheme (``"1:-1"``, ``"all"``, ...);
                ``--kv-layers`` / ``$MLX_TQ_LAYERS`` override it;
            description: one line shown by ``mlx-lm-turboquant doctor``.
    """
