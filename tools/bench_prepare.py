#!/usr/bin/env python
"""Throughput of `imitation-jax prepare` on a ShareGPT-style dump, and packing vs padding.

    python tools/bench_prepare.py --tokenizer data/demo/tokenizer.model --conversations 50000
    python tools/bench_prepare.py --tokenizer DIR_WITH_TOKENIZER_JSON --template llama3 --workers 2

Writes DIR/sharegpt.json (unless --input is given): a JSON array like the scraped ShareGPT dumps —
the synthetic demo conversations, half of the replies as ChatGPT-page HTML (paragraphs, lists,
code widgets with "Copy code" buttons), multi-turn conversations with a long tail of lengths,
system prompts, and planted noise (duplicates, empty and unanswered conversations, leading
assistant turns). Then prepares it with each packing method and prints conversations/s, tokens/s
and the non-pad fraction of packed vs. padded rows, and how long the first set takes to open and
to read every training row once in random batches of 8 (as the loader reads). The last line is
machine-readable.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import numpy as np

from imitation_jax.data.cleaning import CleaningConfig
from imitation_jax.data.prepare import PrepareSettings, prepare, summary
from imitation_jax.data.storage import PreparedSet
from imitation_jax.demo.synthetic import generate_conversations


def _html(text: str, rng: random.Random) -> str:
    out = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        if para.startswith("```"):
            lang = lines[0][3:] or "python"
            code = "\n".join(lines[1:-1]).replace("&", "&amp;").replace("<", "&lt;")
            out.append(f'<pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center">'
                       f'<span>{lang}</span><button class="flex ml-auto gap-2">Copy code</button>'
                       f'</div><div class="p-4"><code class="hljs language-{lang}">{code}</code>'
                       f'</div></div></pre>')
        elif all(line[:2] in ("- ", "* ") or line[:1].isdigit() for line in lines) and len(lines) > 1:
            tag = "ol" if lines[0][:1].isdigit() else "ul"
            items = "".join(f"<li>{line.split(' ', 1)[-1]}</li>" for line in lines)
            out.append(f"<{tag}>{items}</{tag}>")
        else:
            out.append("<p>" + para.replace("\n", "<br>") + "</p>")
    return '<div class="markdown prose w-full break-words">' + "".join(out) + "</div>"


def make_dump(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    base = generate_conversations(n, seed)
    records = []
    for i, conv in enumerate(base):
        msgs = list(conv["messages"])
        if rng.random() < 0.25:  # a long multi-turn conversation
            for other in rng.sample(base, rng.choice((2, 4, 8, 16))):
                msgs += [m for m in other["messages"] if m["role"] != "system"]
        if rng.random() < 0.05:  # a very long reply
            k = next(j for j, m in enumerate(msgs) if m["role"] == "assistant")
            msgs[k] = {**msgs[k], "content": "\n\n".join([msgs[k]["content"]] * rng.randint(10, 40))}
        turns = []
        for m in msgs:
            value = m["content"]
            if m["role"] == "assistant" and rng.random() < 0.5:
                value = _html(value, rng)
            turns.append({"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                          "value": value})
        r = rng.random()
        first = 1 if turns and turns[0]["from"] == "system" else 0
        if r < 0.01:
            turns = []
        elif r < 0.02:
            turns = turns[:1]
        elif r < 0.03:
            turns.insert(first, {"from": "gpt", "value": "Hello! How can I help you today?"})
        elif r < 0.04:
            turns.insert(first + 1, {"from": "human", "value": ""})
        records.append({"id": f"bench-{i}", "conversations": turns})
        if rng.random() < 0.03:
            records.append({"id": f"bench-{i}-dup", "conversations": turns})
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=2)


def time_reading(directory: str, batch: int = 8) -> tuple[float, float]:
    """Seconds to open the training split and read its first row, and to read every row once
    in random batches of `batch`."""
    start = time.perf_counter()
    rows = PreparedSet(directory).split("train")
    rows.take([0])
    opened = time.perf_counter() - start
    order = np.random.default_rng(0).permutation(len(rows))
    start = time.perf_counter()
    for i in range(0, len(order), batch):
        rows.take(order[i:i + batch])
    return opened, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--template", default="koala")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--conversations", type=int, default=20000)
    parser.add_argument("--input", help="an existing dump to prepare instead of a generated one")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--packing", nargs="+", default=["best_fit", "first_fit"])
    args = parser.parse_args(argv)

    work = args.dir or tempfile.mkdtemp(prefix="bench_prepare-")
    os.makedirs(work, exist_ok=True)
    dump = args.input
    if dump is None:
        dump = os.path.join(work, "sharegpt.json")
        start = time.perf_counter()
        make_dump(dump, args.conversations)
        print(f"wrote {dump}: {os.path.getsize(dump) / 1e6:.0f} MB in {time.perf_counter() - start:.0f} s")
    results = {}
    for method in args.packing:
        settings = PrepareSettings(tokenizer=args.tokenizer, template=args.template,
                                   seq_len=args.seq_len, packing=method, eval_fraction=0.01,
                                   cleaning=CleaningConfig(filter_phrases=["as an ai language model"]))
        stats = prepare([dump], os.path.join(work, f"prepared-{method}"), settings,
                        workers=args.workers, progress=False)
        print(summary(stats))
        results[method] = stats
    first = results[args.packing[0]]
    t, train = first["timing"], first["splits"]["train"]
    opened, read = time_reading(first["path"])
    packed = " ".join(f"{m}={r['splits']['train']['non_pad_fraction']:.4f}" for m, r in results.items())
    print(f"conversations_per_s={t['conversations_per_s']:.0f} tokens_per_s={t['tokens_per_s']:.0f} "
          f"workers={t['workers']} {packed} padded={train['padded_non_pad_fraction']:.4f} "
          f"prepare_s={t['seconds']:.2f} rows={train['rows']} open_ms={opened * 1e3:.1f} "
          f"read_all_rows_s={read:.2f} cpus={os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
