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


def init_source(cfg):
    """`init.checkpoint` / `init.hf` as the loop's `init` (None when neither is set). Its
    architecture (init.hf's config.json, init.checkpoint's model.json or run config) is set now,
    before the run is built."""
    if not (cfg.init.checkpoint or cfg.init.hf):
        return None
    from imitation_jax.convert.init_params import initial_params, with_checkpoint_architecture, with_hf_architecture

    if cfg.init.hf:
        cfg.model = with_hf_architecture(cfg.model, cfg.init.hf)
    else:
        cfg.model = with_checkpoint_architecture(cfg.model, cfg.init.checkpoint)
    return lambda program, seed: initial_params(cfg.init, program.model, program.mesh,
                                                program.abstract["params"], seed)


def adapter_source(cfg):
    """`init.adapter` as the loop's `adapters` (None when unset). Sets model.lora and, when neither
    is set, init.hf / init.checkpoint from the adapter now: call it before `init_source`."""
    from imitation_jax.convert.adapter_init import apply_adapter_source, initial_adapters

    source = apply_adapter_source(cfg)
    if source is None:
        return None
    return lambda program: initial_adapters(source, program.model, program.abstract["params"])


def teacher_source(cfg):
    """kd.source=teacher: the teacher (a run dir, import-hf dir or HF dir) loaded frozen onto the
    run's mesh, its parameters placed by the same sharding rules (None for other objectives)."""
    if not (cfg.train.objective == "kd" and cfg.kd.source == "teacher"):
        return None
    from imitation_jax.convert.loading import load_model

    return lambda mesh: load_model(cfg.kd.teacher, dtype=cfg.kd.teacher_dtype, mesh=mesh)


def task_eval_hook(program, tokenizer):
    """lm-eval tasks on the live parameters (`eval.tasks`) as a training-loop hook."""
    if not program.cfg.eval.tasks:
        return None
    from imitation_jax.evaluation.in_training import TaskEval

    return TaskEval(program.cfg, program.graphdef, tokenizer)


def run_training(cfg, restart: bool = False) -> dict:
    """`train` with what the command layer adds: the init sources (params, LoRA adapters), the
    task-eval hook, the in-mesh teacher and kd.on_policy's rollout (commands.on_policy)."""
    from imitation_jax.commands.on_policy import on_policy_source
    from imitation_jax.train.loop import train

    adapters = adapter_source(cfg)  # before init_source: it may set init.hf / init.checkpoint
    return train(cfg, restart=restart, init=init_source(cfg), hooks=(task_eval_hook,),
                 teacher=teacher_source(cfg), batch_transform=on_policy_source(cfg), adapters=adapters)


def run(args: argparse.Namespace) -> int:
    import jax

    from imitation_jax import distributed, host_memory
    from imitation_jax.train.config import load_config
    from imitation_jax.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    host_memory.configure(cfg.train.host_memory)  # before XLA starts its threads
    try:
        distributed.initialize(cfg.distributed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    summary = run_training(cfg, restart=args.restart)
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
