"""The ``mlx-lm-turboquant`` command.

Subcommands register themselves with :func:`command`; each gets its own parser::

    @command("doctor", help="...")
    def doctor(parser):          # called once to add arguments
        parser.add_argument(...)
        return run               # run(args) -> exit status
"""

import argparse
import importlib
import os
import sys
from typing import Callable, Dict, Optional

_COMMANDS: Dict[str, tuple] = {}
# Modules whose import registers more subcommands (absent ones are skipped).
COMMAND_MODULES = ("mlx_lm_turboquant.eval.cli",)


def command(name: str, help: str):
    """Register ``setup(parser) -> run`` as subcommand ``name``."""

    def register(setup: Callable):
        _COMMANDS[name] = (help, setup)
        return setup

    return register


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def _site_files():
    """Bootstrap files found at the root of the site-packages directories."""
    import site

    dirs = list(getattr(site, "getsitepackages", lambda: [])())
    user = getattr(site, "getusersitepackages", lambda: None)()
    dirs += [user] if user else []
    found = []
    for d in dirs:
        for f in ("mlx_lm_turboquant.pth", "mlx_lm_turboquant.start", "_mlx_lm_turboquant_boot.py"):
            if os.path.exists(os.path.join(d, f)):
                found.append(os.path.join(d, f))
    return found


def _kernels_line() -> str:
    """Which fused kernels would run here (the kernel registry's own view)."""
    try:
        kernels = importlib.import_module("mlx_lm_turboquant.kernels")
        backend = kernels.active_backend()
        ops = ", ".join(
            f"{op} {'fused' if kernels.get_op(op) is not None else 'pure MLX'}"
            for op in kernels.OPS
        )
        name = getattr(backend, "NAME", None) or "none (pure-MLX reference path)"
        return f"{kernels.ENV}={kernels.choice()}; backend kernels: {name}; {ops}"
    except Exception as e:  # the registry is optional for this report
        return f"kernel registry unavailable ({type(e).__name__}: {e}); pure-MLX reference path"


@command("doctor", help="versions, bootstrap and patch status, backend, kernels, schemes")
def _doctor(parser):
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 unless every core patch is active"
    )

    def run(args) -> int:
        from .integration import bootstrap

        boot = bootstrap.status()  # read before importing mlx-lm below
        lines = [f"mlx-lm-turboquant {_version('mlx-lm-turboquant')} "
                 f"(package at {os.path.dirname(os.path.abspath(__file__))})"]  # fmt: skip
        lines.append(f"python {sys.version.split()[0]} ({sys.executable})")
        lines.append(
            "mlx "
            + _version("mlx")
            + ", mlx-lm "
            + _version("mlx-lm")
            + ", pluggy "
            + _version("pluggy")
            + ", wrapt "
            + _version("wrapt")
        )
        import mlx.core as mx

        backends = []
        for name in ("metal", "cuda"):
            mod = getattr(mx, name, None)
            ok = bool(mod is not None and getattr(mod, "is_available", lambda: False)())
            backends.append(f"{name} {'yes' if ok else 'no'}")
        lines.append(f"backend: default device {mx.default_device()}; " + ", ".join(backends))
        files = _site_files()
        lines.append(
            "bootstrap files: " + (", ".join(files) if files else "none found in site-packages")
        )
        if boot["disabled"]:
            lines.append("bootstrap: disabled by MLX_TQ_DISABLE=1")
        elif boot["booted"]:
            lines.append("bootstrap: ran at start-up; import finder " +
                         ("installed" if boot["finder_installed"] else "MISSING"))  # fmt: skip
        else:
            lines.append("bootstrap: did not run (no .pth in this environment, or python -S); "
                         "call mlx_lm_turboquant.activate() in scripts")  # fmt: skip
        for name, message in boot["errors"]:
            lines.append(f"bootstrap error while patching {name}: {message}")

        import mlx_lm  # noqa: F401  (fires the hooks when the bootstrap ran)

        from . import integration

        status = integration.installed()
        core = {k: status[k] for k in integration.CORE_SEAMS}
        lines.append(
            "core patches: " + ", ".join(f"{k} {'on' if v else 'off'}" for k, v in core.items())
        )
        lines.append(
            "command patches apply when a command runs: " + ", ".join(integration.COMMAND_SEAMS)
        )
        lines.append(f"kernels: {_kernels_line()}")
        from .schemes import available

        by_plugin: Dict[str, list] = {}
        for info in available().values():
            by_plugin.setdefault(info.plugin, []).append(info.scheme.name)
        for plugin, names in by_plugin.items():
            lines.append(f"schemes ({plugin}): {', '.join(names)}")
        for var in (
            "MLX_TQ_DISABLE",
            "MLX_TQ_SCHEME",
            "MLX_TQ_LAYERS",
            "MLX_TQ_QUIET",
            "MLX_TQ_NO_PLUGINS",
        ):
            if var in os.environ:
                lines.append(f"env {var}={os.environ[var]}")
        print("\n".join(lines))
        if args.strict and not all(core.values()):
            return 1
        return 0

    return run


def build_parser() -> argparse.ArgumentParser:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    parser = argparse.ArgumentParser(
        prog="mlx-lm-turboquant", description="TurboQuant KV-cache compression for mlx-lm"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help, setup) in _COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(_run=setup(p))
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    status = args._run(args)
    sys.exit(status or 0)
