"""The `asft` command. Each subcommand lives in the module that holds its work and registers
itself through an `add_cli(subparsers)` function listed here."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import warnings
from typing import Any

# subcommand name -> "module:function" that adds its parser (imported only when needed)
COMMANDS: dict[str, str] = {
    "directions": "asft_optim.directions:add_cli",
    "inspect": "asft_optim.inspection:add_cli",
    "demo": "asft_optim.demo.run:add_cli",
    "finetune": "asft_optim.finetune.cli:add_cli",
    "evaluate": "asft_optim.evaluation.evaluate:add_cli",
    "project": "asft_optim.project:add_cli",
    "compare": "asft_optim.compare:add_cli",
}

# subcommand name -> the extras it needs; extra -> the modules it installs
NEEDS: dict[str, tuple[str, ...]] = {"demo": ("hf", "plot"), "finetune": ("hf", "plot")}
EXTRAS: dict[str, tuple[str, ...]] = {"hf": ("transformers", "peft", "accelerate"), "plot": ("matplotlib",)}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def missing_extras(command: str) -> str | None:
    """The error message for a subcommand whose extras are not installed, or None when they are."""
    needs = NEEDS.get(command, ())
    absent = [m for extra in needs for m in EXTRAS[extra] if not _installed(m)]
    if not absent:
        return None
    names = " and ".join(f"'{e}'" for e in needs)
    return (f"asft {command} needs the {names} extra{'s' if len(needs) > 1 else ''} (not installed: "
            f"{', '.join(absent)}): pip install \"asft_optim[{','.join(needs)}]\" (from a checkout: "
            f"pip install -e \".[{','.join(needs)}]\")")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless it is None or False (nothing to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if any(action.default is x for x in (None, False, argparse.SUPPRESS)) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


class _SubParsers(argparse._SubParsersAction):
    """Subcommand parsers that take no abbreviations (`--lamb` is not `--lambdas`) and show their
    defaults in `--help`."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _Help)
        return super().add_parser(name, **kwargs)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The `asft` parser; with `only`, import and register just that subcommand (faster, and one
    subcommand's heavy imports cannot break another)."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="asft", description="AsFT: anchoring safety in fine-tuning",
                                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"asft {__version__}")
    parser.register("action", "parsers", _SubParsers)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help=", ".join(COMMANDS))
    for name, spec in COMMANDS.items():
        if only is None or name == only:
            module, func = spec.split(":")
            getattr(importlib.import_module(module), func)(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, but an unknown option is reported with its subcommand's usage line."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = _parse(build_parser(only), argv)
    message = missing_extras(args.command)
    if message is not None:
        print(message, file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        # deprecations inside transformers/peft that they trigger themselves: nothing a user can act on
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
        return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
