"""`imitation-jax`: one command, one subcommand per pipeline step. User mistakes end with one
line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys

EXIT_USER_ERROR = 2


def _cmd_train(args: argparse.Namespace) -> int:
    import jax

    from imitation_jax import distributed, host_memory
    from imitation_jax.config import ConfigError, load_config
    from imitation_jax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    host_memory.configure(cfg.train.host_memory)  # before XLA starts its threads
    try:
        distributed.initialize(cfg.distributed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    summary = train(cfg, restart=args.restart)
    if summary["preempted"]:
        from imitation_jax.train.preemption import EXIT_PREEMPTED

        return EXIT_PREEMPTED
    if jax.process_index() != 0:
        return 0
    print(f"run dir:    {summary['run_dir']}")
    print(f"steps:      {summary['steps']}")
    if summary["first_loss"] is None:
        print(f"nothing to do: the run already reached step {summary['start_step']}")
    else:
        print(f"first loss: {summary['first_loss']:.4f}")
        print(f"last loss:  {summary['last_loss']:.4f}")
    if summary["eval"]:
        print(f"eval loss:  {summary['eval']['loss']:.4f} (accuracy {summary['eval']['accuracy']:.3f})")
    print(f"checkpoint: {summary['checkpoint']}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from imitation_jax.data.cleaning import CleaningConfig
    from imitation_jax.data.prepare import PrepareSettings, prepare, summary

    settings = PrepareSettings(
        tokenizer=args.tokenizer, template=args.template, seq_len=args.seq_len,
        packing=args.packing, turn_tokens=args.turn_tokens, eval_fraction=args.eval_fraction,
        skip_invalid=args.skip_invalid, format=args.format, seed=args.seed,
        diversity_sample=args.diversity_sample,
        cleaning=CleaningConfig(
            html_to_markdown=not args.no_html_to_markdown, dedup=not args.no_dedup,
            filter_phrases=list(args.filter_phrase), merge_same_role=not args.no_merge_same_role,
            drop_leading_assistant=not args.keep_leading_assistant,
            split_long=not args.no_split_long, truncate_long_turns=args.truncate_long_turns))
    stats = prepare(args.inputs, args.out, settings, eval_inputs=args.eval, workers=args.workers,
                    progress=not args.quiet)
    print(summary(stats))
    return 0


def _add_prepare(sub) -> None:
    from imitation_jax.data.formats import FORMATS
    from imitation_jax.data.packing import PACKING
    from imitation_jax.data.templates import TEMPLATE_NAMES

    p = sub.add_parser("prepare", help="clean, tokenize, mask and pack conversations into DIR",
                       description="Input files (ShareGPT, OpenAI messages, Alpaca, plain text; "
                       "JSON, JSONL or .txt, optionally .gz) -> packed, masked rows in ArrayRecord "
                       "files (DIR/imitation_rows/), DIR/stats.json and a printed summary. Give an "
                       "input as PATH or PATH:format=F,weight=W (or count=N).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="training inputs")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model or a tokenizer directory")
    p.add_argument("--template", required=True, choices=TEMPLATE_NAMES,
                   help="chat template ('hf': the tokenizer's chat_template with generation markers)")
    p.add_argument("--seq-len", type=int, required=True, help="row length in tokens")
    p.add_argument("--out", required=True, help="output directory (replaced if it holds a prepared set)")
    p.add_argument("--eval", action="append", default=[], metavar="INPUT",
                   help="a held-out eval input (repeatable)")
    p.add_argument("--eval-fraction", type=float, default=0.0,
                   help="hold out this fraction of the training conversations for eval")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip invalid records (counted by reason in stats.json) instead of stopping")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizing processes (default: all cores; in-process for small inputs)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                   help="format of inputs that do not say (default: detected per file)")
    p.add_argument("--packing", default="best_fit", choices=PACKING,
                   help="best_fit (default), first_fit, or none (one conversation per padded row)")
    p.add_argument("--turn-tokens", action="store_true",
                   help="add special tokens <|user|>/<|assistant|> marking each turn")
    p.add_argument("--filter-phrase", action="append", default=[], metavar="TEXT",
                   help="drop conversations containing TEXT (case-insensitive; repeatable)")
    p.add_argument("--no-html-to-markdown", action="store_true", help="keep HTML turns as they are")
    p.add_argument("--no-dedup", action="store_true", help="keep exact-duplicate conversations")
    p.add_argument("--no-merge-same-role", action="store_true",
                   help="keep consecutive turns of one role separate")
    p.add_argument("--keep-leading-assistant", action="store_true",
                   help="keep an assistant turn that opens a conversation")
    p.add_argument("--no-split-long", action="store_true",
                   help="drop conversations longer than a row instead of splitting them at turns")
    p.add_argument("--truncate-long-turns", action="store_true",
                   help="cut an exchange longer than a row at the row's end instead of dropping it")
    p.add_argument("--seed", type=int, default=0, help="seed of the eval split and sampling")
    p.add_argument("--diversity-sample", type=int, default=256,
                   help="user queries sampled for the diversity figure (0: skip)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)


def _cmd_compile_check(args: argparse.Namespace) -> int:
    from imitation_jax.compile_check import compile_check, parse_topology
    from imitation_jax.config import ConfigError, load_config

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


def _add_compile_check(sub) -> None:
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
    p.set_defaults(func=_cmd_compile_check)
    p.__class__ = _IntermixedParser  # overrides may come before or after --topology


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imitation-jax", description=__doc__.split(". ")[0] + ".")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a student (config YAML + dotted.key=value overrides)")
    p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=30 run_dir=runs/x")
    p.add_argument("--restart", action="store_true",
                   help="start over in a run dir that has checkpoints (they are renamed, not deleted); "
                        "without it training resumes from the newest complete checkpoint")
    p.set_defaults(func=_cmd_train)
    _add_prepare(sub)
    _add_compile_check(sub)
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub) -> None:
    import importlib
    import pkgutil

    from imitation_jax import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)


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
