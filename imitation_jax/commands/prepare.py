"""`imitation-jax prepare INPUT... --out DIR`: clean, tokenize, mask and pack conversations."""

from __future__ import annotations

import argparse


def register(sub) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
