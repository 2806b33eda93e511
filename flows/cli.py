"""The `fmbseg` command line (DESIGN §7): one vocabulary of flags across subcommands.

Each subcommand lives in the module that owns it and registers itself with `register(subparsers)`; heavy
imports happen inside the command functions so `fmbseg --help` stays fast. Exit status: 0 when the command
did its job (including campaigns where some images failed), 2 with a one-line reason for bad arguments or
missing inputs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that register subcommands, in the order `fmbseg --help` lists them.
COMMAND_MODULES = ("flows.commands_label", "flows.commands_stage2", "flows.commands_stats", "flows.demo")


class UsageError(Exception):
    """Bad arguments or missing inputs: reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmbseg", description="Annotation-free semantic segmentation with vision foundation models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a command module not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"fmbseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fmbseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
