"""`imitation-jax study CONFIG [dotted.key=value ...]`: the imitation experiment end to end."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "study", help="run the imitation study (teacher, bases, imitation sets, students, evals, table, plots)",
        description="Runs the reference study's experiment as resumable stages: a synthetic world, a teacher "
        "trained and served through an OpenAI-compatible API (or a real teacher's URL), base students, "
        "imitation sets collected from the teacher (local: bootstrapped; broad: all task types) at several "
        "token budgets, every student fine-tuned and evaluated (lm-eval tasks and a style judge), then one "
        "table (WORK_DIR/results/results.{json,md}) and plots. A finished stage is not redone; deleting a "
        "student's checkpoints recomputes that student and its rows.")
    p.add_argument("config", help="study YAML, e.g. configs/study/mini.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. work_dir=runs/study imitation.budgets=[1000,4000]")
    p.add_argument("--plan", action="store_true", help="print the stages and whether each is done; run nothing")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from imitation_jax.study.config import load_study_config
    from imitation_jax.study.runner import Study
    from imitation_jax.study.stages import StudyError

    cfg = load_study_config(args.config, args.overrides)
    study = Study(cfg)
    if args.plan:
        stages = study.plan()
        for i, s in enumerate(stages, 1):
            print(f"[{i:3d}/{len(stages)}] {s.name:<44} {'done' if study.state.is_done(s) else 'to run'}")
        return 0
    try:
        summary = study.run()
    except StudyError as exc:
        import sys

        print(f"imitation-jax study: error: {exc}", file=sys.stderr)
        return 1
    print(f"study: ran {len(summary['ran'])} of {len(summary['stages'])} stages in {summary['seconds']:.0f}s")
    with open(f"{summary['results']}/results.md") as f:
        print(f.read())
    print(f"results: {summary['results']}/results.json, results.md, plots/")
    return 0
