"""`imitation-jax eval MODEL --tasks T1,T2 --out results.json`: lm-eval on a run dir, checkpoint or
HF dir with our JAX backend (or lm-eval's own `hf` backend on an exported dir, to cross-check)."""

from __future__ import annotations

import argparse

from imitation_jax.commands import add_model_arguments


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="run lm-eval tasks on a model (run dir, checkpoint or HF dir)",
        description="Runs lm-eval tasks offline on MODEL with our JAX backend (model 'imitation_jax'), or with "
        "lm-eval's own 'hf' backend on a Hugging Face dir (--backend hf, e.g. an export-hf output) to cross-check. "
        "The shipped offline suite (mini_mmlu, mini_nq_open, mini_humaneval, mini_perplexity; tag mini_suite) is "
        "always on the include path; lm-eval's own tasks (mmlu, nq_open, humaneval, ...) work where their data is "
        "in the local Hugging Face datasets cache.")
    add_model_arguments(p)
    p.add_argument("--tasks", required=True, help="comma-separated task, group or tag names (e.g. mini_suite)")
    p.add_argument("--out", required=True, help="where to write lm-eval's results JSON")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a directory of extra task YAMLs (repeatable)")
    p.add_argument("--limit", type=float, default=None,
                   help="at most N documents per task (a value below 1: that fraction)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    p.add_argument("--log-samples", action="store_true", help="keep every request and response in the JSON")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--backend", choices=("ours", "hf"), default="ours",
                   help="ours: JAX (any MODEL); hf: lm-eval's transformers backend (an HF dir)")
    p.add_argument("--confirm-run-unsafe-code", action="store_true",
                   help="allow tasks marked unsafe_code (lm-eval's humaneval) to execute generated code")
    p.add_argument("--seed", type=int, default=0, help="few-shot sampling and sampling seed")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts with the model's chat template (--backend hf: the exported chat_template)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from imitation_jax.errors import ConfigError
    from imitation_jax.evaluation import runner

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit {args.limit}: must be positive")
    runner.offline()
    if args.backend == "hf" and args.step is not None:
        raise ConfigError("--step applies to a run dir with --backend ours")
    if args.apply_chat_template and args.backend != "hf":
        raise ConfigError("--apply-chat-template: our backend scores plain-text prompts only; export the model "
                          "(imitation-jax export-hf MODEL --out HF_DIR) and use --backend hf, whose tokenizer "
                          "carries the training template as its chat_template")
    lm = runner.make_lm(args.model, args.backend, batch_size=args.batch_size, dtype=args.dtype, step=args.step)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = runner.run_eval(lm, tasks, include_paths=args.include_path, limit=limit,
                              num_fewshot=args.num_fewshot, log_samples=args.log_samples,
                              confirm_run_unsafe_code=args.confirm_run_unsafe_code, seed=args.seed,
                              apply_chat_template=args.apply_chat_template)
    results.setdefault("config", {})["imitation_jax"] = {"model": args.model, "backend": args.backend,
                                                         "step": args.step, "tasks": tasks}
    runner.write_results(results, args.out)
    print(runner.results_table(results))
    print(f"results: {args.out}")
    return 0
