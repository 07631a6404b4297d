#!/usr/bin/env python
"""Writes the bundled CPU demo's data: synthetic teacher conversations and a tokenizer for them.

    python tools/make_demo_data.py --out data/demo

DIR/train.jsonl and DIR/eval.jsonl (OpenAI-messages JSONL), DIR/tokenizer.model (+ .vocab, a
SentencePiece BPE model trained on the training split), and DIR/demo_data.json recording the
arguments. When that record matches, nothing is redone (use --force to rebuild anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from imitation_jax.data.formats import parse_messages
from imitation_jax.data.templates import get_template, render_text
from imitation_jax.data.tokenizer import train_sentencepiece
from imitation_jax.demo.synthetic import generate_conversations

OUTPUTS = ("train.jsonl", "eval.jsonl", "tokenizer.model", "tokenizer.vocab")
STAMP = "demo_data.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/demo", help="output directory (default data/demo)")
    parser.add_argument("--num-conversations", type=int, default=4000)
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", default="koala",
                        help="chat template whose markers the tokenizer also learns")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    if args.num_conversations < 2 or not 0 < args.eval_fraction < 1:
        parser.error("need --num-conversations >= 2 and 0 < --eval-fraction < 1")
    template = get_template(args.template)

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "force")}
    stamp_path = os.path.join(args.out, STAMP)
    if not args.force and _up_to_date(args.out, stamp_path, settings):
        print(f"{args.out}: up to date (use --force to rebuild)")
        return 0

    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    if os.path.exists(stamp_path):
        os.remove(stamp_path)  # a run cut short must not look up to date
    records = generate_conversations(args.num_conversations, args.seed)
    n_eval = max(1, round(len(records) * args.eval_fraction))
    splits = {"train": records[:-n_eval], "eval": records[-n_eval:]}
    for name, split in splits.items():
        with open(os.path.join(args.out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in split:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    texts = [render_text(parse_messages(r, r["id"]), template) for r in splits["train"]]
    train_sentencepiece(texts, os.path.join(args.out, "tokenizer"), args.vocab_size)
    with open(stamp_path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)
    print(f"{args.out}: {len(splits['train'])} train + {len(splits['eval'])} eval conversations, "
          f"tokenizer with {args.vocab_size} pieces ({time.perf_counter() - start:.1f} s)")
    return 0


def _up_to_date(out: str, stamp_path: str, settings: dict) -> bool:
    try:
        with open(stamp_path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return False
    return recorded == settings and all(os.path.exists(os.path.join(out, p)) for p in OUTPUTS)


if __name__ == "__main__":
    sys.exit(main())
