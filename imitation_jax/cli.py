"""`imitation-jax`: one command, one subcommand per pipeline step. User mistakes end with one
line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from imitation_jax.commands import EXIT_USER_ERROR

# Subcommand modules under imitation_jax.commands, in the order `--help` lists them. Each defines
# `register(sub)`, which adds its argparse subparser(s) and imports nothing heavy.
COMMANDS = ("prepare", "train", "compile_check", "convert", "generate", "chat", "serve", "eval",
            "collect", "judge", "plot", "study")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imitation-jax", description=__doc__.split(". ")[0] + ".")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"imitation_jax.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from imitation_jax.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"imitation-jax {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"imitation-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
