"""`imitation-jax compile-check CONFIG --topology SLICE`: will this config fit that TPU slice?"""

from __future__ import annotations

import argparse
import sys

from imitation_jax.commands import EXIT_USER_ERROR


class _IntermixedParser(argparse.ArgumentParser):
    """Positionals (config, overrides) and options in any order: plain argparse gives all positionals
    to the first run of them, so `CONFIG --topology X key=value` would reject `key=value`."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def register(sub) -> None:
    p = sub.add_parser(
        "compile-check", help="compile the train step for a TPU slice (no TPU needed) and check it fits in HBM",
        description="Lowers and compiles the real train step of CONFIG for a TPU topology with libtpu's "
        "compile-only devices (install with `make install-tpu`), prints per-device memory against the chip's "
        "HBM. Exit 0: fits; 1: does not fit; 2: a user error. v4-N/v5p-N count TensorCores (2 per chip), "
        "v5e-N/v6e-N count chips; a shape such as v4:2x2x4 works too.")
    p.add_argument("config", help="YAML config, e.g. configs/llama7b_tpu_v5e.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.batch_size=64 model.remat=full")
    p.add_argument("--topology", required=True, help="TPU slice: v5e-256, v4-32, v5p-128, v6e-64, v4:2x2x4, ...")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size when model.vocab_size is 0 (compile-check reads no tokenizer)")
    p.set_defaults(func=run)
    p.__class__ = _IntermixedParser  # overrides may come before or after --topology


def run(args: argparse.Namespace) -> int:
    from imitation_jax.train.compile_check import compile_check, parse_topology
    from imitation_jax.train.config import load_config
    from imitation_jax.errors import ConfigError

    try:
        topo = parse_topology(args.topology)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cfg = load_config(args.config, args.overrides)
    try:
        report = compile_check(cfg, topo, vocab_size=args.vocab_size)
    except RuntimeError as exc:  # no libtpu
        print(f"imitation-jax compile-check: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0 if report.fits else 1
