"""`imitation-jax prepare [INPUT...] [--config FILE.yaml] [data.key=value ...] --out DIR`: clean,
tokenize, mask and pack conversations.

Its settings are the `data.*` keys of a train config (imitation_jax.data.config.DataConfig), and
every flag is an alias of one of them: the same keys give the same rows here and in `train`.
"""

from __future__ import annotations

import argparse
import os
import re

_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")  # key=value; an input PATH:format=F has a ':' first

PRECEDENCE = """\
Settings: the data.* keys of a train config. Lowest first: the defaults < the data: section of
--config FILE.yaml (its other sections are ignored) < the flags and data.key=value overrides,
applied in the order given (a later one wins). Each flag sets the key its help names; a
repeatable flag (--eval, --filter-phrase) collects its values into one list for that key.
INPUTs given here replace data.train_files; INPUTs and overrides stand together, before or after
the flags. Keys only training uses (data.path, data.cache_dir, data.max_train_tokens, data.seed)
are accepted and ignored."""


class _Flag(argparse.Action):
    """A flag that sets one data.* key: records (where, key, value) in the order given."""

    def __init__(self, option_strings, dest, key: str, append: bool = False, **kwargs):
        self.key, self.append = key, append
        if kwargs.get("nargs") != 0 and not kwargs.get("choices"):
            kwargs.setdefault("metavar", option_strings[0].lstrip("-").upper().replace("-", "_"))
        super().__init__(option_strings, "layers", default=None, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.nargs == 0 else values
        if self.append:  # the values of every use so far, as one list
            collected = dict(getattr(namespace, "collected", None) or {})
            value = collected[self.key] = collected.get(self.key, []) + [value]
            namespace.collected = collected
        _record(namespace, (option_string, self.key, value))


class _Items(argparse.Action):
    """Positional INPUTs (training inputs) and data.key=value overrides, in order."""

    def __call__(self, parser, namespace, values, option_string=None):
        inputs = [v for v in values if not _is_override(v)]
        for item in values:
            if _is_override(item):
                _record(namespace, item)
            elif inputs:  # all inputs as one layer, where the first one stands
                _record(namespace, ("INPUT", "train_files", inputs))
                inputs = []


def _is_override(item: str) -> bool:
    return bool(_OVERRIDE.match(item)) and not os.path.exists(item)


def _record(namespace, entry) -> None:
    namespace.layers = [*(getattr(namespace, "layers", None) or []), entry]


def settings_layers(entries) -> list:
    """(where, layer) for OmegaConf from what the flags and overrides recorded, in order."""
    from omegaconf import OmegaConf

    from imitation_jax.errors import ConfigError
    from imitation_jax.settings import read_layers

    layers = []
    for entry in entries or []:
        if isinstance(entry, str):  # a data.key=value override
            if not entry.startswith("data."):
                raise ConfigError(f"override '{entry}': prepare takes data.* keys (data.key=value)")
            layers += read_layers(None, [entry])
            continue
        where, key, value = entry
        for part in reversed(f"data.{key}".split(".")):
            value = {part: value}
        layers.append((where, OmegaConf.create(value)))
    return layers


def register(sub) -> None:
    from imitation_jax.data.formats import FORMATS
    from imitation_jax.data.packing import PACKING
    from imitation_jax.data.templates import TEMPLATE_NAMES

    p = sub.add_parser("prepare", help="clean, tokenize, mask and pack conversations into DIR",
                       epilog=PRECEDENCE,
                       description="Input files (ShareGPT, OpenAI messages, Alpaca, plain text; "
                       "JSON, JSONL or .txt, optionally .gz) -> packed, masked rows in ArrayRecord "
                       "files (DIR/imitation_rows/), DIR/stats.json and a printed summary. Give an "
                       "input as PATH or PATH:format=F,weight=W (or count=N).")
    p.add_argument("items", nargs="*", action=_Items, metavar="INPUT | data.key=value",
                   help="training inputs (default: data.train_files), and data.* overrides")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="a train config: the settings in its data: section")
    p.add_argument("--out", required=True, help="output directory (replaced if it holds a prepared set)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    flag = p.add_argument
    flag("--tokenizer", action=_Flag, key="tokenizer",
         help="data.tokenizer: SentencePiece .model or a tokenizer directory (required)")
    flag("--template", action=_Flag, key="template", choices=TEMPLATE_NAMES,
         help="data.template: chat template (default koala; 'hf': the tokenizer's chat_template "
              "with generation markers)")
    flag("--seq-len", action=_Flag, key="seq_len", type=int,
         help="data.seq_len: row length in tokens (default 512)")
    flag("--eval", action=_Flag, key="eval_files", append=True, metavar="INPUT",
         help="data.eval_files: a held-out eval input (repeatable)")
    flag("--eval-fraction", action=_Flag, key="eval_fraction", type=float,
         help="data.eval_fraction: hold out this fraction of the training conversations for eval")
    flag("--skip-invalid", action=_Flag, key="skip_invalid", nargs=0, const=True,
         help="data.skip_invalid: skip invalid records (counted by reason in stats.json) "
              "instead of stopping")
    flag("--workers", action=_Flag, key="workers", type=int,
         help="data.workers: tokenizing processes (default: all cores; in-process for small inputs)")
    flag("--format", action=_Flag, key="format", choices=("auto", *FORMATS),
         help="data.format: format of inputs that do not say (default: detected per file)")
    flag("--packing", action=_Flag, key="packing", choices=PACKING,
         help="data.packing: best_fit (default), first_fit, or none (one conversation per padded row)")
    flag("--turn-tokens", action=_Flag, key="turn_tokens", nargs=0, const=True,
         help="data.turn_tokens: add special tokens <|user|>/<|assistant|> marking each turn")
    flag("--filter-phrase", action=_Flag, key="cleaning.filter_phrases", append=True, metavar="TEXT",
         help="data.cleaning.filter_phrases: drop conversations containing TEXT "
              "(case-insensitive; repeatable)")
    flag("--no-html-to-markdown", action=_Flag, key="cleaning.html_to_markdown", nargs=0, const=False,
         help="data.cleaning.html_to_markdown=false: keep HTML turns as they are")
    flag("--no-dedup", action=_Flag, key="cleaning.dedup", nargs=0, const=False,
         help="data.cleaning.dedup=false: keep exact-duplicate conversations")
    flag("--no-merge-same-role", action=_Flag, key="cleaning.merge_same_role", nargs=0, const=False,
         help="data.cleaning.merge_same_role=false: keep consecutive turns of one role separate")
    flag("--keep-leading-assistant", action=_Flag, key="cleaning.drop_leading_assistant", nargs=0,
         const=False, help="data.cleaning.drop_leading_assistant=false: keep an assistant turn "
                           "that opens a conversation")
    flag("--no-split-long", action=_Flag, key="cleaning.split_long", nargs=0, const=False,
         help="data.cleaning.split_long=false: drop conversations longer than a row instead of "
              "splitting them at turns")
    flag("--truncate-long-turns", action=_Flag, key="cleaning.truncate_long_turns", nargs=0, const=True,
         help="data.cleaning.truncate_long_turns: cut an exchange longer than a row at the row's "
              "end instead of dropping it")
    flag("--seed", action=_Flag, key="split_seed", type=int,
         help="data.split_seed: seed of the eval split and per-source sampling (default 0)")
    flag("--diversity-sample", action=_Flag, key="diversity_sample", type=int,
         help="data.diversity_sample: user queries sampled for the diversity figure (default 256; 0: skip)")
    p.set_defaults(func=run)


def data_settings(config: str | None, entries=()) -> "DataConfig":  # noqa: F821
    """The DataConfig from a train config's data: section, then the flags and overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from imitation_jax.data.config import DataConfig
    from imitation_jax.errors import ConfigError
    from imitation_jax.settings import merge_layers, one_line, read_layers

    # Only data.* is typed: the other sections of a train config pass unchecked and unused.
    base = OmegaConf.create({"data": OmegaConf.structured(DataConfig)})
    cfg = merge_layers(base, read_layers(config) + settings_layers(entries))
    try:
        return OmegaConf.to_object(cfg.data)
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc, config or "config")) from None


def run(args: argparse.Namespace) -> int:
    from imitation_jax.data.prepare import prepare, summary

    data = data_settings(args.config, args.layers)
    stats = prepare(data.train_files, args.out, data, eval_inputs=data.eval_files,
                    progress=not args.quiet)
    print(summary(stats))
    return 0
