"""`imitation-jax judge`: pairwise preference of two systems' answers by a judge model."""

from __future__ import annotations

import argparse
import json
import os


def register(sub) -> None:
    p = sub.add_parser(
        "judge", help="pairwise judgements of two answer files by a judge model (both orders)",
        description="Matches the answers of A and B by id and asks JUDGE, through an "
        "OpenAI-compatible API, which is better, once in each order (position bias cancels); "
        "prints win/tie/loss rates of A with 95%% confidence intervals and writes them, with every "
        "verdict, to --out (one judge at a time per --out: a second exits 2 naming the first). "
        "The API key is read from OPENAI_API_KEY.")
    p.add_argument("--a", required=True, help="answers of system A (JSONL from collect or generate)")
    p.add_argument("--b", required=True, help="answers of system B")
    p.add_argument("--base-url", required=True, help="judge API base URL")
    p.add_argument("--model", required=True, help="judge model name")
    p.add_argument("--out", default=None, help="report JSON (default: A_vs_B.judge.json)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=512, help="judge reply length limit")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--max-retries", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from imitation_jax.collect.judge import describe, judge
    from imitation_jax.collect.output_lock import hold_output

    out = args.out or (f"{os.path.splitext(os.path.basename(args.a))[0]}_vs_"
                       f"{os.path.splitext(os.path.basename(args.b))[0]}.judge.json")
    with hold_output(out, "judge"):  # before any request: a second judge of OUT would pay twice
        report = judge(args.a, args.b, model=args.model, base_url=args.base_url,
                       concurrency=args.concurrency, max_tokens=args.max_tokens, timeout=args.timeout,
                       max_retries=args.max_retries, progress=not args.quiet)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
    print(describe(report))
    print(f"report: {out}")
    return 0
