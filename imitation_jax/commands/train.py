"""`imitation-jax train CONFIG [key=value ...]`: train a student, resuming where a run stopped."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("train", help="train a student (config YAML + dotted.key=value overrides)")
    p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=30 run_dir=runs/x")
    p.add_argument("--restart", action="store_true",
                   help="start over in a run dir that has checkpoints (they are renamed, not deleted); "
                        "without it training resumes from the newest complete checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from imitation_jax import distributed, host_memory
    from imitation_jax.train.config import load_config
    from imitation_jax.errors import ConfigError
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
