"""`imitation-jax`: one command, one subcommand per pipeline step. User mistakes end with one
line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys

EXIT_USER_ERROR = 2


def _cmd_train(args: argparse.Namespace) -> int:
    import jax

    from imitation_jax import distributed
    from imitation_jax.config import ConfigError, load_config
    from imitation_jax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    try:
        distributed.initialize(cfg.distributed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    summary = train(cfg)
    if jax.process_index() != 0:
        return 0
    print(f"run dir:    {summary['run_dir']}")
    print(f"steps:      {summary['steps']}")
    print(f"first loss: {summary['first_loss']:.4f}")
    print(f"last loss:  {summary['last_loss']:.4f}")
    if summary["eval"]:
        print(f"eval loss:  {summary['eval']['loss']:.4f} (accuracy {summary['eval']['accuracy']:.3f})")
    print(f"checkpoint: {summary['checkpoint']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imitation-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a student (config YAML + dotted.key=value overrides)")
    p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=30 run_dir=runs/x")
    p.set_defaults(func=_cmd_train)
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
