"""The `asft` command. Each subcommand lives in the module that holds its work and registers
itself through an `add_cli(subparsers)` function listed here."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> "module:function" that adds its parser (imported only when needed)
COMMANDS: dict[str, str] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asft", description="AsFT: anchoring safety in fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    for spec in COMMANDS.values():
        module, func = spec.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
