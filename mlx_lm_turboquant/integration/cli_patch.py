"""Seams: ``--kv-scheme`` / ``--kv-layers`` on mlx-lm's commands, one switch per command.

``generate``, ``chat``, ``cache_prompt`` and ``benchmark`` build their parser in
``setup_arg_parser()`` (looked up by ``main`` at call time): that function is wrapped.
``server``, ``evaluate`` and ``perplexity`` build it inline in ``main()``: ``main`` is
wrapped, and during the call the first ``ArgumentParser.parse_args`` adds the flags.
"""

import argparse
import dataclasses
import sys

from . import _patching, report, state

PARSER_FUNCTION = {
    "generate": "setup_arg_parser",
    "chat": "setup_arg_parser",
    "cache_prompt": "setup_arg_parser",
    "benchmark": "setup_arg_parser",
    "server": "main",
    "evaluate": "main",
    "perplexity": "main",
}
COMMANDS = tuple(PARSER_FUNCTION)


def _scheme_help() -> str:
    from ..schemes import available

    names = list(available())
    return (
        "KV-cache compression scheme (mlx-lm-turboquant): "
        + ", ".join(names)
        + "; 'none' for mlx-lm's plain cache. Default: $MLX_TQ_SCHEME, else none. "
        "Prints a one-line report on stderr per cache (silence: MLX_TQ_QUIET=1)."
    )


def add_arguments(parser: argparse.ArgumentParser, command: str):
    if any("--kv-scheme" in a.option_strings for a in parser._actions):
        return
    group = parser.add_argument_group("TurboQuant KV cache (mlx-lm-turboquant)")
    group.add_argument("--kv-scheme", metavar="NAME", default=None, help=_scheme_help())
    group.add_argument(
        "--kv-layers",
        metavar="SPEC",
        default=None,
        help="Full-attention layers to compress: 'all', '1:-1', '0,3-7', 'all,!0'; per-layer "
        "schemes '-1=turbo8v4', or a calibrated plan '@plan.json' "
        "(default: $MLX_TQ_LAYERS, else the scheme's default).",
    )
    if command == "perplexity":
        group.add_argument(
            "--kv-chunk-size",
            type=int,
            default=None,
            help="With --kv-scheme, tokens fed through the cache per step (default 256).",
        )


def after_parse(parser: argparse.ArgumentParser, args, command: str):
    """Validate the TurboQuant flags against the rest; errors exit like argparse's."""
    from ..config import parse_layer_plan
    from . import generate_patch

    name, layers = getattr(args, "kv_scheme", None), getattr(args, "kv_layers", None)
    try:
        if name is not None:
            selection = state.select(name, layers, "--kv-scheme")
        else:
            selection = state.from_env()
            if layers is not None:
                if selection is None:
                    parser.error("--kv-layers needs --kv-scheme (or MLX_TQ_SCHEME)")
                selection = dataclasses.replace(selection, layers=layers)
        if layers is not None:
            parse_layer_plan(layers, 4096, "turbo4")  # syntax only; ranges are checked per model
    except ValueError as e:
        parser.error(str(e))
    on = selection is not None and selection.scheme is not None
    if on and getattr(args, "kv_bits", None) is not None:
        parser.error(
            f"{selection.source} {selection.scheme.name} cannot be combined with --kv-bits: "
            "both compress the KV cache; use one of them"
        )
    batched = command == "server" or (command == "benchmark" and getattr(args, "batch_size", 1) > 1)
    if on and batched:
        schemes = _layer_schemes(selection)
        for what, names, letter in (
            ("a recent-token window", [s.name for s in schemes if s.window], "w<N>"),
            ("centred keys", [s.name for s in schemes if s.centre_keys], "c"),
        ):
            if names:
                parser.error(
                    f"{', '.join(names)} keep {what}, which batch caches (mlx_lm.{command} "
                    f"batches requests) do not support yet; use the scheme without {letter}"
                )
    if command == "perplexity" and args.kv_chunk_size is not None:
        if not on:
            parser.error("--kv-chunk-size needs --kv-scheme (or MLX_TQ_SCHEME)")
        if args.kv_chunk_size < 1:
            parser.error("--kv-chunk-size must be at least 1")
        state.options["kv_chunk_size"] = args.kv_chunk_size
    if on and generate_patch.batch_support_missing():
        if command == "benchmark" and getattr(args, "batch_size", 1) > 1:
            parser.error(
                f"{selection.source} {selection.scheme.name}: {generate_patch.BATCH_MESSAGE}"
            )
        if command == "server":
            report.emit(
                f"server: {selection.scheme.name} caches have no batch support yet, so "
                "requests are served one at a time (no continuous batching)",
                force=True,
            )
    if name is not None or layers is not None:
        state.set_cli(selection)
    return args


def _layer_schemes(selection) -> list:
    """The selection's base scheme and the per-layer schemes of its layer spec, by name."""
    from ..config import layer_spec_in_force, parse_layer_plan

    spec = layer_spec_in_force(selection.layers, selection.info.layers)
    schemes = {selection.scheme}
    if spec is not None:
        schemes |= set(parse_layer_plan(spec, 4096, selection.scheme).values())
    return sorted(schemes, key=lambda s: s.name)


def _with_parse_hook(parser, command):
    original = parser.parse_args

    def parse_args(args=None, namespace=None):
        return after_parse(parser, original(args, namespace), command)

    parser.parse_args = parse_args
    return parser


def _wrap_setup_arg_parser(command):
    def wrap(original):
        def setup_arg_parser(*args, **kwargs):
            parser = original(*args, **kwargs)
            add_arguments(parser, command)
            return _with_parse_hook(parser, command)

        return setup_arg_parser

    return wrap


def _first_parse_hook(command, before=None):
    """A replacement for ``ArgumentParser.parse_args`` that adds the flags to the first
    parser parsed, then puts the plain method back."""
    plain = argparse.ArgumentParser.parse_args

    def parse_args(self, a=None, namespace=None):
        argparse.ArgumentParser.parse_args = plain  # first parser only
        if before is not None:
            before()
        add_arguments(self, command)
        return after_parse(self, plain(self, a, namespace), command)

    return plain, parse_args


def _wrap_main(command):
    def wrap(original):
        def main(*args, **kwargs):
            plain, parse_args = _first_parse_hook(command)
            argparse.ArgumentParser.parse_args = parse_args
            try:
                return original(*args, **kwargs)
            finally:
                if argparse.ArgumentParser.parse_args is parse_args:
                    argparse.ArgumentParser.parse_args = plain

        return main

    return wrap


def main_module_command():
    """The command run as ``python -m mlx_lm.<command>`` in this process, or None."""
    argv = list(getattr(sys, "orig_argv", []))
    i = 1
    while i < len(argv) - 1:
        arg = argv[i]
        if arg == "-m":
            module = argv[i + 1]
            break
        if arg == "-c" or not arg.startswith("-"):  # a script or -c code: not -m
            return None
        i += 2 if arg in ("-X", "-W", "--check-hash-based-pycs") else 1
    else:
        return None
    command = module[len("mlx_lm.") :] if module.startswith("mlx_lm.") else None
    return command if command in PARSER_FUNCTION else None


def install_for_main_module(command):
    """``python -m mlx_lm.<command>`` runs a second copy of the module as ``__main__``,
    which the seams above never see. Its ``main()`` parses once: the first
    ``parse_args`` of the process gains the flags (and perplexity's ``__main__`` copy of
    ``eval_ppl`` is swapped at that moment, when the module has been fully defined)."""
    from . import perplexity_patch

    def before():
        main = sys.modules.get("__main__")
        if command == "perplexity" and main is not None and hasattr(main, "eval_ppl"):
            _patching.swap(main, "eval_ppl", perplexity_patch._wrap, copies=False)

    if _patching.swapped(argparse.ArgumentParser, "parse_args"):
        return
    plain, parse_args = _first_parse_hook(command, before)
    setattr(parse_args, _patching.MARK, plain)
    argparse.ArgumentParser.parse_args = parse_args


def uninstall_main_module_hook():
    """Drop the hook above if no parser has consumed it yet."""
    _patching.restore(argparse.ArgumentParser, "parse_args", copies=False)


class CommandSeam:
    """install() / uninstall() / is_installed() for one command's parser."""

    def __init__(self, command: str):
        if command not in PARSER_FUNCTION:
            raise ValueError(f"unknown mlx-lm command {command!r}; known: {', '.join(COMMANDS)}")
        self.command = command
        self.module_name = f"mlx_lm.{command}"
        self.attr = PARSER_FUNCTION[command]

    def __repr__(self):
        return f"CommandSeam({self.command!r})"

    def _wrap(self):
        if self.attr == "main":
            return _wrap_main(self.command)
        return _wrap_setup_arg_parser(self.command)

    def install(self):
        """Patch the command if its module is loaded (the bootstrap does it on import)."""
        module = _patching.loaded(self.module_name)
        if module is not None:
            _patching.swap(module, self.attr, self._wrap(), copies=False)

    def uninstall(self):
        module = _patching.loaded(self.module_name)
        if module is not None:
            _patching.restore(module, self.attr, copies=False)

    def is_installed(self) -> bool:
        module = _patching.loaded(self.module_name)
        return module is not None and _patching.swapped(module, self.attr)
