"""`imitation-jax plot RUN_DIR... --out DIR`: loss curves and score-vs-imitation-data figures."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "plot", help="PNG figures from run dirs: loss curves; score vs imitation tokens per base-model size",
        description="Writes DIR/loss.png (train and eval loss by step), DIR/task_curves.png (task scores "
        "evaluated during training) and, across runs, DIR/score_<task>_<metric>.png: score against imitation "
        "tokens (log scale) with one line per base-model size, dotted base-model and dashed teacher reference "
        "lines. A run's base model, token count and scores come from its config.yaml, metrics.jsonl, eval/*.json "
        "and optional study.json (see docs/eval.md, 'plot').")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run dirs (imitation-jax train)")
    p.add_argument("--out", required=True, help="directory for the PNGs")
    p.add_argument("--base", action="append", default=[], metavar="SIZE=RESULTS.json",
                   help="base-model scores for a size, e.g. llama-7b=evals/llama7b.json (repeatable)")
    p.add_argument("--teacher", default=None, metavar="RESULTS.json", help="the teacher's scores")
    p.add_argument("--teacher-name", default="teacher", help="legend label of the teacher line (e.g. ChatGPT)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from imitation_jax.errors import ConfigError
    from imitation_jax.evaluation.plots import plot_runs

    base = {}
    for item in args.base:
        size, sep, path = item.partition("=")
        if not sep or not size or not path:
            raise ConfigError(f"--base {item!r}: expected SIZE=RESULTS.json")
        base[size] = path
    result = plot_runs(args.runs, args.out, base, args.teacher, args.teacher_name)
    for run in result["runs"]:
        tokens = f"{run.imitation_tokens:.3g}" if run.imitation_tokens else "unknown"
        print(f"{run.name}: base {run.base_model}, imitation tokens {tokens}, {len(run.scores)} scores")
    for path in result["written"]:
        print(f"wrote {path}")
    return 0
